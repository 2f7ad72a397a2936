"""Fine-tune a pretrained image classifier with RIFLE. See `hf_rifle/recipe/train.py`, or run with --help.

python scripts/train.py                      # offline demo: packaged ImageNet weights, real digits
python scripts/train.py --dataset_name ethz/food101 --samples_per_class 30 --output_dir outputs/food101-30
accelerate launch --num_processes 4 scripts/train.py --dataset_name ... # data-parallel on 4 GPUs
"""

from hf_rifle.recipe import cli

if __name__ == "__main__":
    cli()  # main() with user errors said in one line and an exit code (hf_rifle.recipe.errors)

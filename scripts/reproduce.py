"""Regenerate the RIFLE paper's Tables 1-2 and Figures 1-2 on one dataset. See `hf_rifle/paper/sweeps.py`.

python scripts/reproduce.py --sweep_dir outputs/table1 -- --demo                  # offline default
python scripts/reproduce.py --methods original rifle_a rifle_b rifle --sweep_dir outputs/table2 -- --demo
python scripts/reproduce.py --dataset_label CUB-200-2011 -- --dataset_name <hub id> --num_train_epochs 40
"""

from hf_rifle.paper.sweeps import main

if __name__ == "__main__":
    main()

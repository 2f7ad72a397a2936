"""The MLP-oracle study of Section 4.6.2 of the RIFLE paper. See `hf_rifle/paper/mlp_oracle.py`, or run with --help.

python scripts/mlp_oracle.py --seeds 10 --output_json mlp_oracle.json --output_md mlp_oracle.md
"""

from hf_rifle.paper.mlp_oracle import main

if __name__ == "__main__":
    main()

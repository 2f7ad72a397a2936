"""Run the recipe with the paper kit's baselines on argv[1:], as `hf-rifle-train` runs it: a user's mistake ends
in one line and its exit code."""

import sys

from hf_rifle.paper.baselines import BASELINES
from hf_rifle.recipe import main
from hf_rifle.recipe.errors import user_errors_reported

if __name__ == "__main__":
    with user_errors_reported("baselines_worker"):
        main(sys.argv[1:], extensions=[BASELINES])

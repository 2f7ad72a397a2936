"""Runs the recipe (`hf_rifle.recipe.main`) on several argument lists in one process, for the error cases of a Hub
test: one import of the stack instead of one per case. Prints, per case, the error's type, message and traceback as
JSON, or null for a run that finished."""

import json
import sys
import traceback

from hf_rifle.recipe import main

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        main(argv)
        results[name] = None
    except Exception as error:
        results[name] = {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
print("RESULTS " + json.dumps(results))

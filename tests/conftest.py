"""Tests run offline: nothing may reach the Hugging Face Hub. The datasets cache (and the recipe's image cache in
it) is the test session's own, so no test reads what an earlier session or a user's runs left there."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_rifle-tests-datasets-"))

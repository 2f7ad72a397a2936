"""Imported at startup by the Hub tests' processes (their PYTHONPATH names this folder).

datasets looks up a Hub dataset's parquet export on a host it derives from HF_ENDPOINT (`datasets-server.` + the
endpoint's host), which the loopback Hub does not serve: the lookup is switched off, so these processes send
requests to the loopback Hub only.
"""

import datasets.config

datasets.config.USE_PARQUET_EXPORT = False

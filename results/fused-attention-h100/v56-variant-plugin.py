# pytest plugin: run the GPU tests with near_attention.VARIANT from $NEAR_VARIANT (v56, NOTES.md).
# v56-fused-pytest-variant-4.txt ran as: NEAR_VARIANT=4 PYTHONPATH=<dir of this file, then named v55plug.py>:$PYTHONPATH
#   python3 -m pytest -q -n 4 -p no:cacheprovider -p v55plug test/suite/test_fused.py -k '...' (the file's first line)
# at tree 2813d1b (near_attention.VARIANT was removed after the run).
import os
from deberta_tools import near_attention
near_attention.VARIANT = int(os.environ.get("NEAR_VARIANT", "0"))
def pytest_report_header(config):
    return f"near_attention.VARIANT {near_attention.VARIANT}"

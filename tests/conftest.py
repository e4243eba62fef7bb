import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# prompt features and ONNX encoders (evaluate.cache_folder) go to a folder of this run, never the user's
# cache; the commands the tests start inherit it
os.environ["MOBILEFETALCLIP_CACHE"] = tempfile.mkdtemp(prefix="mobilefetalclip-cache-")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread runs them many times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

import pytest
import torch

from upreid.ops import HAS_EXTENSION, built_with_cuda

CUDA_OK = torch.cuda.is_available() and built_with_cuda()


def devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)] if CUDA_OK else ["cpu"]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and the CUDA build of upreid._C")
    for item in items:
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    return (f"upreid: extension built={HAS_EXTENSION}, cuda kernels={built_with_cuda()}, "
            f"torch={torch.__version__}, cuda available={torch.cuda.is_available()}")

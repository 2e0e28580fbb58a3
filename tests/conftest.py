import random

import pytest
import torch

from hub_server import hub_server  # noqa: F401  (the `hub_server` fixture: a local Hub-compatible server)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so its outcome does not depend on which tests ran before."""
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy
    except ImportError:
        return
    numpy.random.seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run many small ops: one intra-op thread is faster and kinder to a shared machine.

    Modules that want it say ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

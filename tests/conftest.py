import pytest
import torch

from hub_server import hub_server  # noqa: F401  (the `hub_server` fixture: a local Hub-compatible server)


@pytest.fixture
def one_thread():
    """Tiny models run many small ops: one intra-op thread is faster and kinder to a shared machine.

    Modules that want it say ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

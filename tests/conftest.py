import threading

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def no_thread_leak():
    """Fails the test if a mmapload reader or copy thread outlives it."""
    yield
    alive = [t for t in threading.enumerate() if t.name in ("mmapload-reader", "mmapload-copier")]
    assert not alive, f"reader threads still running: {alive}"


@pytest.fixture(scope="session")
def gib_checkpoint(tmp_path_factory):
    """A llama-shaped bf16 checkpoint of about 1.1 GiB, 2 shards, generated once per run."""
    from mmapload.synth import make_llama_checkpoint
    return make_llama_checkpoint(tmp_path_factory.mktemp("gib"), int(1.1 * 2**30), shards=2)

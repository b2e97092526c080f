import os

import pytest
import torch

# Tests never phone home: MLflow telemetry off, no Ray usage stats.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from mdlm.config import model_config_for


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def perturb_(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (the adaLN and output layers start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


@pytest.fixture
def tiny_config():
    return model_config_for("cpu", vocab_size=32, mask_token_id=31, max_seq_len=16, dropout=0.0, n_layers=2,
                            hidden_size=64, n_heads=4, cond_dim=32)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 2 CPUs for one test module (no dashboard, no progress bars), shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()

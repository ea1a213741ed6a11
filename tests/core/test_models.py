"""Loading base models: loads from several threads at once each give a whole model and leave the
process as they found it (transformers' loading swaps process-wide state in and out)."""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from speft_core.models import bundled_minilm_path, load_model, load_tokenizer

ROUNDS = 3


def _unloaded(model: nn.Module) -> list[str]:
    """Tensors left without weights (on the meta device)."""
    return [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]


def test_concurrent_loads_of_two_models_each_give_a_whole_model(stories_dir: Path):
    init_functions = {name: getattr(nn.init, name) for name in dir(nn.init)
                      if name.endswith("_") and not name.startswith("_")}
    loads = [lambda: load_model(stories_dir, "causal_lm"),
             lambda: load_model(bundled_minilm_path(), "classification", labels=["a", "b"]),
             lambda: load_tokenizer(stories_dir)] * 2
    outcomes: list[object] = []
    for _ in range(ROUNDS):
        start = threading.Barrier(len(loads))

        def run(load) -> None:
            start.wait()
            try:
                outcomes.append(load())
            except Exception as err:  # noqa: BLE001 - every outcome is checked below
                outcomes.append(err)

        threads = [threading.Thread(target=run, args=(load,)) for load in loads]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert not failed, failed
    assert not [_unloaded(o) for o in outcomes if isinstance(o, nn.Module) and _unloaded(o)]
    assert {name for name, f in init_functions.items() if getattr(nn.init, name) is not f} == set()
    model = load_model(stories_dir, "causal_lm")  # and a load afterwards is whole too
    assert not _unloaded(model)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

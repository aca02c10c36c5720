"""What the server knows about the model besides the config (`ServerModel`) and its evaluation hooks."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common.algorithm import layer_compressors
from ..common.lmo import LayerSpec
from ..common.model import evaluate
from ..common.shards import check_shardable, shard_layers


@dataclass
class ServerModel:
    """What the server knows about the model besides the config.

    Optional hooks, all run on the server's compute thread:
      `evaluate(W, X) -> dict`  after rounds the config asks to evaluate: "loss_w", "loss_x" and any
                                extra round entries (e.g. "val_loss_w");
      `initial(W) -> dict`      once before round 1: summary entries (e.g. "initial_loss");
      `final(W, X) -> dict`     after the last round: summary entries (eval_loss_w, f_star, ...).
    """

    names: list[str]
    params: list[torch.Tensor]
    specs: list[LayerSpec]
    evaluate: Callable[[list, list], dict] | None = None
    initial: Callable[[list], dict] | None = None
    final: Callable[[list, list], dict] | None = None
    # a shard's model (docs/design.md §6.3): the global indices of its layers, and (index, count); None: the whole
    layer_ids: list[int] | None = None
    shard: tuple[int, int] | None = None

    @classmethod
    def from_setup(cls, setup, device=None) -> "ServerModel":
        """A built-in task, evaluated exactly as `efmuon simulate` does (on `device`, the server's, as
        simulate evaluates on --device: a 124M model's evaluation on a CUDA server stays on the GPU)."""

        eval_model = setup.task.build_model()
        if device is not None:
            eval_model = eval_model.to(device)
        task = setup.task  # the hooks keep the task, not the Setup (its model and initial parameters)

        def per_round(W, X) -> dict:
            # = simulate.eval_losses(setup, eval_model, W, X)
            lw, lx = evaluate(eval_model, W, task.train_eval_loss), evaluate(eval_model, X, task.train_eval_loss)
            return {"loss_w": lw, "loss_x": lx, "val_loss_w": evaluate(eval_model, W, task.eval_loss)}

        def initial(W) -> dict:
            return {"initial_loss": evaluate(eval_model, W, task.train_eval_loss)}

        def final(W, X) -> dict:
            return {"eval_loss_w": evaluate(eval_model, W, task.eval_loss),
                    "eval_loss_x": evaluate(eval_model, X, task.eval_loss),
                    "f_star": getattr(task, "f_star", None)}

        return cls(setup.names, setup.params, setup.specs, evaluate=per_round, initial=initial, final=final)

    @classmethod
    def shard_of(cls, setup, index: int, count: int) -> "ServerModel":
        """Shard `index` of `count` (common.shards.shard_layers): only its layers, no evaluation hooks (a shard
        cannot evaluate the model; the workers hold the whole W and the report merge evaluates the saved layers).
        The per-layer compressor patterns are checked against the whole model here, as one server would."""
        check_shardable(setup.cfg)
        layer_compressors(setup.specs, setup.cfg.uplink, setup.cfg.uplink_layers)
        layer_compressors(setup.specs, setup.cfg.downlink, setup.cfg.downlink_layers)
        mine = shard_layers(setup.specs, count, setup.cfg.ns_steps)[index]
        return cls([setup.names[i] for i in mine], [setup.params[i] for i in mine], [setup.specs[i] for i in mine],
                   layer_ids=mine, shard=(index, count))

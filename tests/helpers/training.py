"""The distributed-training worker script shared by the DDP and multi-node tests."""

from __future__ import annotations

import textwrap

#: A torchrun worker: ``python worker.py DATASET OUT OVERRIDES_JSON`` trains with `ddcolor.train.Trainer` and saves,
#: per rank, ``rank<N>.pt`` with the world size, the rows it saw per step (sha256) and its final weights.
DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from ddcolor.config import load_config
    from ddcolor.train import Trainer

    dataset, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    seen = []
    forward_backward = Trainer.forward_backward

    def recording(self, micro):
        shas = [s for batch in micro for s in batch["sha256"]]
        seen.append({"step": self.step + 1, "epoch": self.loader.dataset.epoch, "sha256": shas})
        return forward_backward(self, micro)

    Trainer.forward_backward = recording
    trainer = Trainer(load_config(None, overrides), dataset, out_dir=out, progress=False, image_every=0)
    trainer.setup()
    try:
        result = trainer.train()
        rank = trainer.dist.rank
        torch.save(
            {
                "world_size": trainer.dist.world_size,
                "micro_batch": trainer.micro_batch,
                "rows_per_rank": len(trainer.loader.dataset),
                "dropped": {e: list(trainer.loader.dataset.plan(e).dropped) for e in {s["epoch"] for s in seen}},
                "seen": seen,
                "generator": trainer.generator.state_dict(),
                "discriminator": trainer.discriminator.state_dict(),
                "steps": result.steps,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        trainer.cleanup()
    """
)

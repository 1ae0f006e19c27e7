"""One training step per method, data-parallel under torchrun or single-process without it.

Run by tests/test_distributed.py: ``torchrun --nproc_per_node 2 one_step.py OUT METHODS B``
trains on 2 x B images (B per process); ``python one_step.py OUT METHODS 2B`` on the same
2B images in one process. Rank 0 (or the single process) saves, per method, the loss of
each process and the gradient of every parameter to OUT.
"""

import sys

import torch

from mbdml import distributed as D
from mbdml.config import make_config
from mbdml.data.batches import Augmentation, BatchLoader
from mbdml.models import set_batchnorm_eval
from mbdml.components import build_components
from mbdml.training_data import prepare_data


def one_step(method: str, batch: int, ctx: D.DistContext) -> dict:
    cfg = make_config("default", dataset="digits", method=method, width=8, k=20, sigma=0.5, seed=3, alpha=0.0).resolved()
    data = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model, kernel, method_mod = build_components(cfg, data.train.channels, len(data.classes))
    model.eval()
    with torch.no_grad():
        kernel.set_centres(model((data.train.images.float() / 255 - 0.5) / 0.5), data.train.labels, len(data.classes))
    model.train()
    set_batchnorm_eval(model)  # batch statistics are per process on CPUs: compare without them
    loader = BatchLoader(
        data.train.images, data.train.labels, batch, shuffle=True, augmentation=Augmentation(flip=True, crop_padding=1),
        generator=torch.Generator().manual_seed(7), shard=(ctx.rank, ctx.world_size), drop_last=True,
    )
    step = D.wrap_step(model, method_mod, model, torch.device("cpu"), ctx)
    b = next(iter(loader))
    out = step(b.images, b.labels, b.indices, torch.Generator().manual_seed(11))
    out.loss.backward()
    named = list(model.named_parameters()) + [("method." + n, p) for n, p in method_mod.named_parameters()]
    return {
        "losses": D.gather_objects(float(out.loss.detach()), ctx),
        "indices": D.gather_objects(b.indices.tolist(), ctx),
        "grads": {n: p.grad.clone() for n, p in named if p.grad is not None},
    }


def main() -> None:
    out_path, methods, batch = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu")
    results = {m: one_step(m, batch, ctx) for m in methods}
    if ctx.is_main:
        torch.save(results, out_path)
    D.shutdown(ctx)


if __name__ == "__main__":
    main()

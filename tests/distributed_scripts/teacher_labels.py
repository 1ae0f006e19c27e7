"""The teacher's labelling of the unlabelled images, data-parallel under torchrun.

Run by tests/test_distributed.py: ``torchrun --nproc_per_node 2 teacher_labels.py OUT CONFIG``
labels the unlabelled images of the run configuration CONFIG (a JSON file of
``make_config`` keywords with ``teacher`` set) with each process taking its shard.
Rank 0 saves the kept indices, labels and confidences, and how many images each
process embedded, to OUT.
"""

import json
import sys

import torch

from mbdml import distributed as D
from mbdml import embedder, self_training
from mbdml.config import make_config
from mbdml.training_data import prepare_data


def main() -> None:
    out_path, config_path = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu")
    cfg = make_config(**json.loads(open(config_path).read())).resolved()
    data = prepare_data(cfg)
    embedded = []
    plain = embedder.compute_embeddings

    def counting(model, images, **kw):
        embedded.append(len(images))
        return plain(model, images, **kw)

    embedder.compute_embeddings = counting
    labels = self_training.label_with_teacher(cfg, data, torch.device("cpu"), block=50, dist=ctx)
    per_rank = D.gather_objects(sum(embedded), ctx)
    if ctx.is_main:
        torch.save({"indices": labels.indices, "labels": labels.labels, "confidence": labels.confidence, "embedded": per_rank}, out_path)
    D.shutdown(ctx)


if __name__ == "__main__":
    main()

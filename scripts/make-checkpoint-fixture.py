#!/usr/bin/env python3
"""PyTorch side of recfuse's checkpoint tests (tests/checkpoint.rs).

Builds, seeded, three small PyTorch modules written the way their reference code writes them:
  * `linear`: an `nn.Linear(8, 5)`;
  * `gdcn`: the official GDCN cross network (`GateCorssLayer`, sic: the official class name):
    module lists `w` and `wg` of `nn.Linear(D, D, bias=False)` and a parameter list `b`, so
    its state_dict keys are `w.{i}.weight`, `wg.{i}.weight`, `b.{i}`; forward
    `x = x0 * (w[i](x) + b[i]) * sigmoid(wg[i](x)) + x` (recfuse's ops::gated_cross);
  * `ebc`: TorchRec's `EmbeddingBagCollection` layout, an `nn.ModuleDict` `embedding_bags` of
    `nn.EmbeddingBag(rows, dim, mode="sum")`, keys `embedding_bags.{table}.weight`;
and saves, with `safetensors.torch.save_file`, their state_dicts (prefixed `linear.`, `gdcn.`,
`ebc.`), an input batch (`inputs.*`, f32; bag indices and offsets as I64 in recfuse's
table-major layout) and torch's float64-computed outputs (`outputs.*`, F64), to
tests/fixtures/torch_checkpoint.safetensors (a few KB, committed: CI has no torch).

Run (torch, numpy and safetensors in a venv outside the repository):
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy safetensors
    /tmp/torchenv/bin/python scripts/make-checkpoint-fixture.py            # writes the fixture

The other direction, a recfuse-written checkpoint loading in PyTorch:
    RECFUSE_CHECKPOINT_OUT=/tmp/recfuse.safetensors cargo test --test checkpoint recfuse_writes
    /tmp/torchenv/bin/python scripts/make-checkpoint-fixture.py --verify /tmp/recfuse.safetensors
The test writes recfuse-initialised weights under the same names, the same kind of inputs and
recfuse's own f32 outputs, plus Adam state under `optim.*`; --verify drops the `optim.` keys,
loads each module with `load_state_dict(strict=True)`, recomputes in float64 and compares.
"""

import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SEED = 20231106
B = 4
LINEAR = (8, 5)  # in, out
GDCN = (6, 2)  # width D, layers
TABLES = [("user", 6, 4), ("item", 5, 3)]  # name, rows, dim
FIXTURE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "torch_checkpoint.safetensors"
)


class GateCorssLayer(nn.Module):
    """The official GDCN layer (same attribute names, same forward)."""

    def __init__(self, input_dim, cn_layers=3):
        super().__init__()
        self.cn_layers = cn_layers
        self.w = nn.ModuleList([nn.Linear(input_dim, input_dim, bias=False) for _ in range(cn_layers)])
        self.wg = nn.ModuleList([nn.Linear(input_dim, input_dim, bias=False) for _ in range(cn_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros((input_dim,))) for _ in range(cn_layers)])
        for i in range(cn_layers):
            torch.nn.init.uniform_(self.b[i].data)
        self.activation = nn.Sigmoid()

    def forward(self, x):
        x0 = x
        for i in range(self.cn_layers):
            xw = self.w[i](x)
            xg = self.activation(self.wg[i](x))
            x = x0 * (xw + self.b[i]) * xg + x
        return x


class EmbeddingBagCollection(nn.Module):
    """TorchRec's EmbeddingBagCollection state_dict layout: `embedding_bags.{table}.weight`."""

    def __init__(self, tables):
        super().__init__()
        self.embedding_bags = nn.ModuleDict(
            {name: nn.EmbeddingBag(rows, dim, mode="sum") for name, rows, dim in tables}
        )

    def forward(self, indices, offsets, batch):
        """recfuse's layout: table-major offsets of length T·B + 1."""
        out = []
        for t, bag in enumerate(self.embedding_bags.values()):
            lo, hi = offsets[t * batch].item(), offsets[(t + 1) * batch].item()
            off = offsets[t * batch : (t + 1) * batch] - lo
            out.append(F.embedding_bag(indices[lo:hi], bag.weight, off, mode="sum"))
        return torch.cat(out, dim=1)


def build(tables, linear, gdcn):
    return (
        nn.Linear(*linear),
        GateCorssLayer(gdcn[0], gdcn[1]),
        EmbeddingBagCollection(tables),
    )


def inputs(gen, tables):
    x_lin = torch.rand(B, LINEAR[0], generator=gen) * 2 - 1
    x_gdcn = torch.rand(B, GDCN[0], generator=gen) * 2 - 1
    idx, off = [], [0]
    for _, rows, _ in tables:
        for _ in range(B):
            n = int(torch.randint(0, 5, (1,), generator=gen))  # empty bags included
            idx += torch.randint(0, rows, (n,), generator=gen).tolist()
            off.append(len(idx))
    return x_lin, x_gdcn, torch.tensor(idx, dtype=torch.int64), torch.tensor(off, dtype=torch.int64)


def forward64(lin, gdcn, ebc, x_lin, x_gdcn, idx, off):
    """Every module's output in float64 from the same (f32-valued) weights and inputs."""
    with torch.no_grad():
        lin64, gdcn64, ebc64 = (copy.deepcopy(m).double() for m in (lin, gdcn, ebc))
        return (
            lin64(x_lin.double()),
            gdcn64(x_gdcn.double()),
            ebc64(idx, off, B),
        )


def state(prefix, module):
    return {f"{prefix}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}


def make():
    torch.manual_seed(SEED)
    lin, gdcn, ebc = build(TABLES, LINEAR, GDCN)
    gen = torch.Generator().manual_seed(SEED + 1)
    x_lin, x_gdcn, idx, off = inputs(gen, TABLES)
    y_lin, y_gdcn, y_ebc = forward64(lin, gdcn, ebc, x_lin, x_gdcn, idx, off)
    tensors = {**state("linear", lin), **state("gdcn", gdcn), **state("ebc", ebc)}
    tensors.update(
        {
            "inputs.linear_x": x_lin,
            "inputs.gdcn_x": x_gdcn,
            "inputs.ebc_indices": idx,
            "inputs.ebc_offsets": off,
            "outputs.linear_y": y_lin,
            "outputs.gdcn_y": y_gdcn,
            "outputs.ebc_y": y_ebc,
        }
    )
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    save_file(tensors, FIXTURE, metadata={"format": "pt", "source": "scripts/make-checkpoint-fixture.py"})
    print(f"wrote {os.path.normpath(FIXTURE)} ({os.path.getsize(FIXTURE)} bytes):")
    for k in sorted(tensors):
        print(f"  {k:32s} {str(tensors[k].dtype):14s} {list(tensors[k].shape)}")


def sub(sd, prefix):
    return {k[len(prefix) + 1 :]: v for k, v in sd.items() if k.startswith(prefix + ".")}


def verify(path):
    sd = load_file(path)
    optim = [k for k in sd if k.startswith("optim.")]
    model = {k: v for k, v in sd.items() if not k.startswith("optim.")}  # the 5-line recipe
    # Shapes from the file: recfuse chose them.
    w = model["linear.weight"]
    layers = len([k for k in model if k.startswith("gdcn.b.")])
    width = model["gdcn.b.0"].shape[0]
    tables = [
        (k.split(".")[2], v.shape[0], v.shape[1])
        for k, v in model.items()
        if k.startswith("ebc.embedding_bags.")
    ]
    tables.sort(key=lambda t: t[0])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "table_order" in meta:  # the pooled output's table order (the file's keys are sorted)
        names = meta["table_order"].split(",")
        tables.sort(key=lambda t: names.index(t[0]))
    lin, gdcn, ebc = build(tables, (w.shape[1], w.shape[0]), (width, layers))
    lin.load_state_dict(sub(model, "linear"), strict=True)
    gdcn.load_state_dict(sub(model, "gdcn"), strict=True)
    ebc.load_state_dict(sub(model, "ebc"), strict=True)
    x_lin, x_gdcn = model["inputs.linear_x"], model["inputs.gdcn_x"]
    idx, off = model["inputs.ebc_indices"], model["inputs.ebc_offsets"]
    got = forward64(lin, gdcn, ebc, x_lin, x_gdcn, idx, off)
    ok = True
    for name, y in zip(("linear_y", "gdcn_y", "ebc_y"), got):
        ref = model[f"outputs.{name}"].double()
        err = ((y - ref).abs() / (ref.abs() + 1e-3)).max().item()
        status = "ok" if err < 1e-5 else "FAIL"
        ok &= err < 1e-5
        print(f"{name:9s} max relative error vs recfuse's f32 output: {err:.2e} {status}")
    print(f"optimizer state present and dropped before load_state_dict: {len(optim)} tensors")
    if not ok:
        sys.exit(1)
    print("PyTorch reproduces recfuse's outputs from recfuse's checkpoint")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verify", metavar="PATH", help="check a recfuse-written checkpoint in PyTorch")
    a = ap.parse_args()
    verify(a.verify) if a.verify else make()

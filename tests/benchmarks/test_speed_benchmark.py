"""The speed benchmark's parts on a tiny grid: shared cases, records shaped as the committed results, the CLI."""

import importlib.util
import json
import math
import sys
import types

import pytest
import torch
from torch import nn

from benchmarks import report, speed
from benchmarks import speed_measure as measure
from benchmarks.cases import SPEED_LOSS, build_case

TINY = measure.Grid(batches=[4], dims=[8], classes=[5], reps=1, matrix_batch=4, matrix_classes=5, matrix_rows=[5, 10])
COMMITTED = json.loads(report.latest("speed.json").read_text())  # the format every run must keep


def _same_keys(new: dict, committed: dict) -> None:
    assert list(new) == list(committed)


class _StandInFlow(nn.Module):
    """FrEIA's ``GraphINN`` call, ``(x, c=[context]) -> (z, log|det J|)``: a conditional scaling."""

    def __init__(self, features: int, **options):
        super().__init__()
        self.log_scale = nn.Linear(features, features)

    def forward(self, x, c):
        s = torch.tanh(self.log_scale(c[0]))
        return x * s.exp(), s.sum(1)


def _stand_in_log_likelihood(inn, embeddings, proxies, labels):
    z, log_jac = inn(embeddings, c=[nn.functional.normalize(proxies.index_select(0, labels), dim=1)])
    return -0.5 * z.square().sum(1) + log_jac - 0.5 * z.shape[1] * math.log(2 * math.pi)


@pytest.fixture(autouse=True)
def _freia_or_a_stand_in(monkeypatch):
    """FrEIA is a benchmarks extra, not a dev one: without it the FrEIA arm runs a stand-in flow."""
    if importlib.util.find_spec("FrEIA") is None:
        stand_in = types.ModuleType("benchmarks.freia_ref")
        stand_in.build_freia_flow = _StandInFlow
        stand_in.freia_log_likelihood = _stand_in_log_likelihood
        monkeypatch.setitem(sys.modules, "benchmarks.freia_ref", stand_in)


@pytest.fixture(autouse=True)
def _one_thread_and_a_private_inductor_cache(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    yield
    torch.set_num_threads(threads)


def test_a_case_holds_every_arm_on_the_same_inputs():
    case = build_case(4, 8, 5, "cpu", loss_options=SPEED_LOSS)
    assert case.pa is not None and case.freia is not None and case.pa_freia is not None
    assert torch.equal(case.emb, torch.nn.functional.normalize(case.x0.detach(), dim=1))
    again = build_case(4, 8, 5, "cpu", proxy_anchor=False, freia=False)
    assert torch.equal(again.x0, case.x0) and torch.equal(again.labels, case.labels)  # the NIR loss draws first
    for name, per_sample in case.term_variants(compiled=False).items():
        case.term_step(per_sample)()
        assert case.x0.grad is not None and case.x0.grad.isfinite().all(), name
    case.loss_step(case.freia_loss)()
    assert case.pa_freia.proxies.grad is not None and all(
        p.grad is not None for p in case.freia.parameters() if p.requires_grad
    )
    case.zero_grad()
    assert case.x0.grad is None and all(p.grad is None for m in case.modules() for p in m.parameters())


def test_sections_return_records_shaped_as_the_committed_results():
    timer = measure.Timer(torch.device("cpu"))
    loss = measure.loss(TINY, torch.device("cpu"), timer)
    _same_keys(loss[0], COMMITTED["loss"][0])
    assert [(r["B"], r["D"], r["C"]) for r in loss] == [(4, 8, 5)]
    matrix = measure.matrix(TINY, torch.device("cpu"), timer)
    _same_keys(matrix[0], COMMITTED["matrix"][0])
    assert [r["chunk"] for r in matrix] == [1, 2]
    kernels = measure.kernels(torch.device("cpu"), with_compiled=False, B=4, D=8, C=5)
    _same_keys(kernels, COMMITTED["kernels"])
    for mode in ("eager", "eager_bf16"):
        assert list(kernels[mode]) == list(COMMITTED["kernels"][mode])
    assert kernels["eager"]["nir"]["total"] > 0 and kernels["compiled"] == {}
    profile = measure.profile(torch.device("cpu"), with_compiled=False, B=4, D=8, C=5, iters=1)
    assert list(profile) == ["nir", "freia"]
    _same_keys(profile["nir"], COMMITTED["profile"]["nir"])


def test_the_command_line_writes_json_that_the_report_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(speed, "QUICK", TINY)
    out = tmp_path / "speed.json"
    argv = [
        "--quick",
        "--sections",
        "loss,matrix,roofline,kernels",
        "--no-compile",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    result = speed.main(argv)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert list(written) == ["meta", "loss", "matrix", "roofline", "kernels"]
    _same_keys(written["roofline"], COMMITTED["roofline"])
    assert [r["pass"] for r in written["roofline"]["rows"]] == ["matrix (no grad)", "labelled fwd+bwd"]
    _same_keys(written["meta"], COMMITTED["meta"])
    assert written["meta"]["argv"] == argv
    printed = capsys.readouterr().out
    assert report.speed_tables(written) in printed and report.kernels(written) in printed
    assert (
        f"Command: `python benchmarks/speed.py {' '.join(argv)}`".replace(
            str(out), f"benchmarks/results/{report.latest('speed.json').parent.name}/speed.json"
        )
        in printed
    )


def test_the_command_line_names_an_unknown_section():
    with pytest.raises(SystemExit):
        speed.parse_args(["--sections", "loss,nope"])

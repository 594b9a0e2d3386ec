"""The analysis units in-process on a tiny float64 model, against the exact Hessian; the
requests between units, their model checks and their random streams."""
import types
import zlib

import pytest
import torch
from torch import nn

import analyses
from analyses import Analysis, Context, ModelFacts, Request, by_name, selected
from pyhessian_dist import HessianOperator
from support.errors import UserError
from support.outputs import RunOutputs
from support.report import output_files
from tiny import SIZES, analysis_args, dense_hessian, make, split_uneven

CE = nn.CrossEntropyLoss()


def run_units(args, model, batches):
    op = HessianOperator(model, CE, batches)
    worker = types.SimpleNamespace(rank=0, world_size=1)
    ctx = Context(args=args, op=op, model=model, worker=worker)
    analyses = selected(args)
    for analysis in analyses:
        analysis.check(args, analyses)
        ctx.results[analysis.name] = ctx.timed(analysis, lambda a=analysis: a.run(ctx))
    return ctx


@pytest.fixture(scope="module")
def cnn():
    model, x, y = make("cnn")
    return model, split_uneven(x, y, SIZES), dense_hessian(model, CE, x, y)


def test_requirements_pull_in_the_trace():
    names = [a.name for a in selected(analysis_args("--per-layer", "--diagonal"))]
    assert names == ["trace", "per_layer", "diagonal"]


def test_eigenvectors_file_round_trip(cnn, tmp_path):
    model, batches, H = cnn
    args = analysis_args("--eigenvalue", "--top-n", "2", "--bottom-n", "2", "--save-eigenvectors")
    ctx = run_units(args, model, batches)
    with RunOutputs(tmp_path, by_name("eigenvectors").files) as out:
        by_name("eigenvectors").write(ctx.results["eigenvectors"], ctx, out)
        out.commit()
    saved = torch.load(tmp_path / "eigenvectors.pt", weights_only=True)
    names = saved["parameter_names"]
    assert names == [n for n, _ in model.named_parameters()]
    exact = torch.linalg.eigvalsh(H)
    for which, expected in (("top", exact.flip(0)[:2]), ("bottom", exact[:2])):
        values = saved[which]["eigenvalues"]
        torch.testing.assert_close(values, expected, rtol=1e-8, atol=1e-10)
        per_param = saved[which]["eigenvectors"]
        for i, lam in enumerate(values.tolist()):
            v = torch.cat([per_param[n][i].reshape(-1) for n in names])
            assert per_param[names[0]][i].shape == dict(model.named_parameters())[names[0]].shape
            # eigenvector error ~ sqrt(eigenvalue error): the residual is the reported one
            assert torch.linalg.norm(H @ v - lam * v) <= 1e-4 * max(1.0, abs(lam))


def test_per_layer_rows_against_exact_blocks(cnn):
    model, batches, H = cnn
    args = analysis_args("--per-layer", "--trace-method", "deflated", "--trace-deflate", "30",
                 "--trace-rse", "0.01", "--max-iter", "400", "--per-layer-tol", "1e-10")
    ctx = run_units(args, model, batches)
    rows = ctx.results["per_layer"]
    groups = ctx.groups()
    assert [r["name"] for r in rows] == ["conv", "bn", "fc"]
    for row, g in zip(rows, groups):
        block = H[g.index][:, g.index]
        assert row["num_parameters"] == block.shape[0]
        assert abs(row["trace"] - block.trace().item()) <= 4 * row["trace_stderr"]
        assert row["top_eigenvalue"] == pytest.approx(
            torch.linalg.eigvalsh(block)[-1].item(), rel=1e-7, abs=1e-10)
    assert sum(r["trace"] for r in rows) == pytest.approx(ctx.results["trace"].trace, rel=1e-12)
    lines = by_name("per_layer").summary(rows, ctx)
    assert any("sum of the group traces" in line for line in lines)


def test_diagonal_unit_and_file(cnn, tmp_path):
    model, batches, H = cnn
    args = analysis_args("--diagonal", "--trace-method", "deflated", "--trace-deflate", "30",
                 "--trace-rse", "0.01", "--max-iter", "200")
    ctx = run_units(args, model, batches)
    d = ctx.results["diagonal"]
    assert ((d.diagonal - torch.diagonal(H)).abs() <= 4.5 * d.stderr + 1e-12).all()
    with RunOutputs(tmp_path, by_name("diagonal").files) as out:
        by_name("diagonal").write(d, ctx, out)
        out.commit()
    saved = torch.load(tmp_path / "hessian_diagonal.pt", weights_only=True)
    for name, p in model.named_parameters():
        assert saved["diagonal"][name].shape == p.shape == saved["stderr"][name].shape
    assert saved["num_probes"] == d.num_probes


# ---------------------------------------------------------------------------- between units
def test_requests_reach_the_required_unit_with_the_asking_flag():
    args = analysis_args("--per-layer", "--diagonal", "--landscape", "2d")
    selection = selected(args)
    assert selection.asked(by_name("trace")) == [
        Request("trace", "group_samples", True, "--per-layer"),
        Request("trace", "diagonal", True, "--diagonal")]
    assert selection.asked(by_name("eigenvalue")) == [
        Request("eigenvalue", "eigenpairs", 2, "--landscape 2d")]
    assert selection.asked(by_name("density")) == []
    assert selected(analysis_args("--trace")).asked(by_name("trace")) == []


@pytest.mark.parametrize("flag", ["--per-layer", "--diagonal"])
def test_hutchpp_refuses_what_only_hutchinson_probes_give(flag):
    args = analysis_args(flag, "--trace-method", "hutchpp")
    with pytest.raises(UserError) as exc:
        by_name("trace").check(args, selected(args))
    assert str(exc.value) == (f"{flag} uses the probes of the Hutchinson trace; pass "
                              "--trace-method deflated or hutchinson, not hutchpp")
    alone = analysis_args("--trace", "--trace-method", "hutchpp")
    by_name("trace").check(alone, selected(alone))  # nothing asked: nothing refused


def test_the_trace_splits_its_probes_only_when_asked(cnn):
    model, batches, _H = cnn
    flags = ("--trace-method", "hutchinson", "--trace-rse", "0.5", "--max-iter", "12")
    plain = run_units(analysis_args("--trace", *flags), model, batches)
    r = plain.results["trace"]
    assert r.group_samples is None and r.diagonal is None
    assert "group_by" not in by_name("trace").to_json(r, plain)
    asked = run_units(analysis_args("--per-layer", "--diagonal", "--group-by", "stage",
                                    *flags), model, batches)
    r = asked.results["trace"]
    assert r.group_samples.shape == (len(r.samples), len(asked.groups()))
    assert r.diagonal is not None and by_name("trace").to_json(r, asked)["group_by"] == "stage"


def test_save_eigenvectors_works_on_whichever_eigenvalue_unit_runs():
    unit = by_name("eigenvectors")
    for flags in (["--eigenvalue"], ["--bottom-n", "1"], ["--landscape", "1d"]):
        args = analysis_args("--save-eigenvectors", *flags)
        unit.check(args, selected(args))
    args = analysis_args("--save-eigenvectors", "--trace")
    with pytest.raises(UserError, match="^--save-eigenvectors saves the eigenvectors of "):
        unit.check(args, selected(args))


def test_a_unit_may_ask_only_its_requirements_for_what_they_serve(monkeypatch):
    class Asking(Analysis):
        name, flag, requires = "asking", "--asking", ("trace",)
        need = "magic"

        def requests(self, args):
            return [self.ask("trace", self.need)]

    unit = Asking()
    monkeypatch.setattr(analyses, "REGISTRY", [*analyses.REGISTRY, unit])
    args = analysis_args("--asking")  # the patched registry adds its flag
    with pytest.raises(ValueError, match="'asking' asks 'trace' for 'magic'"):
        selected(args)
    unit.need = "diagonal"
    assert [a.name for a in selected(args)] == ["trace", "asking"]
    unit.requires = ()  # asking a unit it does not require
    with pytest.raises(ValueError, match="'asking' asks 'trace' for 'diagonal'"):
        selected(args)


def test_checks_that_need_the_model():
    eig, bottom = by_name("eigenvalue"), by_name("bottom")
    model = ModelFacts(num_trainable=5)
    for unit, flags, message in (
            (eig, ["--eigenvalue", "--top-n", "6"],
             "--top-n 6 exceeds the model's 5 trainable parameters; pass --top-n 5 or less"),
            (bottom, ["--bottom-n", "7"],
             "--bottom-n 7 exceeds the model's 5 trainable parameters; pass --bottom-n 5 or "
             "less")):
        args = analysis_args(*flags)
        with pytest.raises(UserError) as exc:
            unit.check_model(args, selected(args), model)
        assert str(exc.value) == message
        args = analysis_args(*flags[:-1], "5")
        unit.check_model(args, selected(args), model)
    args = analysis_args("--landscape", "2d")
    with pytest.raises(UserError, match=r"^--landscape 2d \(2 eigenpairs\) exceeds the model's "
                                        r"1 trainable parameters"):
        eig.check_model(args, selected(args), ModelFacts(num_trainable=1))


def test_each_unit_has_its_own_random_stream_from_seed_and_name(cnn):
    model, batches, _H = cnn
    op = HessianOperator(model, CE, batches)

    def first_draws(seed, name):
        ctx = Context(args=analysis_args(seed=seed), op=op, model=model,
                      worker=types.SimpleNamespace(rank=0, world_size=1))
        return torch.randn(4, generator=ctx.generator(by_name(name))).tolist()

    names = [a.name for a in analyses.REGISTRY]
    draws = {name: first_draws(1, name) for name in names}
    assert len({tuple(d) for d in draws.values()}) == len(names)  # no two units share one
    assert first_draws(1, "trace") == draws["trace"]  # reproducible
    assert first_draws(2, "trace") != draws["trace"]
    # the rule itself: the CRC-32 of the name continued from --seed (stable across processes)
    expected = torch.Generator().manual_seed(zlib.crc32(b"trace", 1))
    assert draws["trace"] == torch.randn(4, generator=expected).tolist()


def test_the_output_folder_manages_the_runs_and_every_units_files():
    assert output_files(analyses.REGISTRY) == (
        "results.json", "eigenvectors.pt", "per_layer.png", "hessian_diagonal.pt",
        "example.pdf", "example.png", "block_spectra.png", "landscape.png", "landscape.pdf",
        "convergence.png")

    class Clash(Analysis):
        name, files = "clash", ("example.png", "clash.png")

    with pytest.raises(ValueError, match="more than one analysis .* writes example.png$"):
        output_files([*analyses.REGISTRY, Clash()])

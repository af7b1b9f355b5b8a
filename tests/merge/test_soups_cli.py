"""`warpkit merge --method soup | greedy_soup | warm`, the frontier scorer, and WARM used as a reward.

Expected soups are float64 averages of the inputs' tensors; expected greedy scores come from a separate
`run_frontier` evaluation of the same weights; WARM's folder is checked as a reward in the frontier (its
rewards recomputed by hand from the loaded model) and in one real RLOO step of `warpkit.rl`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.merge import scorers as soup_scorers
from warpkit.cli import main
from warpkit.frontier.scorer import frontier_scorer
from warpkit.merge.soups import SOUP_RECORD, check_reward_model, uniform_soup, warm
from warpkit.testing import build_tiny_frontier_models, load_state

PROMPTS = ["The film opens with", "I went in expecting", "The lead actor is", "Overall, this movie is"]


def _reward_model(folder: Path, tokenizer_dir: Path, seed: int, num_labels: int = 1) -> Path:
    """A tiny llama reward model: a shared init (seed 0) plus noise of `seed`, as after RM fine-tuning."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=50256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory, tiny_tokenizer_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("rms")
    return [_reward_model(root / f"rm{s}", tiny_tokenizer_dir, s) for s in (1, 2)]


@pytest.fixture(scope="module")
def warm_folder(tmp_path_factory, reward_models) -> Path:
    out = tmp_path_factory.mktemp("warm") / "warm"
    assert main(["merge", "--method", "warm", "--models", *map(str, reward_models), "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def frontier_models(tmp_path_factory) -> Path:
    return build_tiny_frontier_models(tmp_path_factory.mktemp("frontier-models"))


# ----------------------------------------------------------------------------- soup


def test_cli_weighted_soup_is_the_float64_weighted_average(tiny_model_factory, tmp_path, capsys):
    a, b = tiny_model_factory("llama", False, 0), tiny_model_factory("llama", False, 1)
    out = tmp_path / "soup"
    args = ["merge", "--method", "soup", "--models", str(a), str(b), "--weights", "1", "3", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    assert f"{out} (soup of 2 models" in capsys.readouterr().out
    got, sa, sb = load_state(out), load_state(a), load_state(b)
    assert set(got) == set(sa) and "lm_head.weight" in got  # untied: the head is averaged too
    for n, t in got.items():
        expected = (0.25 * sa[n].double() + 0.75 * sb[n].double()).float()
        torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7, msg=n)
    assert not torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    recipe = json.loads((out / "warpkit_merge.json").read_text())
    assert recipe["method"] == "linear" and recipe["weights"] == [1.0, 3.0]
    assert (out / "tokenizer_config.json").is_file()  # carried from the first model: no --init needed


# ----------------------------------------------------------------------------- greedy soup


def test_cli_greedy_soup_with_scorer_follows_the_docstring_example(tiny_model_factory, tmp_path, capsys):
    folders = {n: Path(shutil.copytree(tiny_model_factory("gpt2", True, s), tmp_path / n)) for n, s in
               (("A", 0), ("B", 1), ("C", 2))}  # fmt: skip
    soup_scorers.CALLS.clear()
    out = tmp_path / "soup"
    args = ["merge", "--method", "greedy_soup", "--models", *(str(folders[n]) for n in "ABC")]
    assert (
        main([*args, "--scorer", "tests.merge.scorers:table_score", "--out", str(out), "--no-progress"]) == 0
    )
    # Candidates scored in input order, then B (0.9) starts, {B, C} 0.92 kept, {A, B, C} 0.91 dropped.
    assert soup_scorers.CALLS == ["A", "B", "C", "B,C", "A,B,C"]
    printed = capsys.readouterr().out
    assert "greedy_soup of 2/3 models, score 0.92" in printed and "dropped" in printed
    record = json.loads((out / SOUP_RECORD).read_text())
    assert [Path(p).name for p in record["order"]] == ["B", "C", "A"]
    assert [(Path(s["candidate"]).name, s["score"], s["kept"]) for s in record["steps"]] == [
        ("B", 0.9, True), ("C", 0.92, True), ("A", 0.91, False)
    ]  # fmt: skip
    assert [Path(p).name for p in record["ingredients"]] == ["B", "C"] and record["score"] == 0.92
    assert [c["score"] for c in record["candidates"]] == [0.7, 0.9, 0.8]
    assert record["scorer"] == "tests.merge.scorers:table_score"
    got, b, c = load_state(out), load_state(folders["B"]), load_state(folders["C"])
    for n in got:
        torch.testing.assert_close(got[n], (b[n] + c[n]) / 2, msg=n)
    assert not [p for p in tmp_path.iterdir() if ".soup-" in p.name or ".tmp-" in p.name]

    # Precomputed --scores: no candidate is scored, only the two mixtures.
    soup_scorers.CALLS.clear()
    again = [*args, "--scorer", "tests.merge.scorers:table_score", "--scores", "0.7", "0.9", "0.8"]
    assert main([*again, "--out", str(tmp_path / "soup2"), "--no-progress"]) == 0
    assert soup_scorers.CALLS == ["B,C", "A,B,C"]


def test_cli_greedy_soup_scored_by_a_frontier_evaluation(frontier_models, tmp_path):
    """bias-2 and bias-6 differ only in a logit bias on ten positive words, so their soup is bias-4 exactly.
    Score = positive-token fraction - 0.04 KL; measured: bias-2 0.000 - 0.04 x 0.015, bias-6 0.104 - 0.04 x
    4.5, bias-4 0.021 - 0.04 x 0.35: the soup beats both and is kept (the trade-off, not luck)."""
    from warpkit.frontier.config import load_frontier_config
    from warpkit.frontier.policies import PolicySpec
    from warpkit.frontier.run import run_frontier

    score_config = tmp_path / "score.yaml"
    score_config.write_text(
        json.dumps(
            {
                "reference": str(frontier_models / "sft"),
                "reward": "tests.merge.scorers:positive_fraction",
                "prompts": PROMPTS,
                "samples_per_prompt": 2,
                "max_new_tokens": 6,
                "batch_size": 8,
                "device": "cpu",
            }
        )  # JSON is YAML; no policies: the scorer evaluates each candidate alone
    )
    candidates = [frontier_models / n for n in ("bias-6", "bias-2")]
    out = tmp_path / "soup"
    kl_coef = 0.04
    argv = ["merge", "--method", "greedy_soup", "--models", *map(str, candidates), "--out", str(out),
            "--score-config", str(score_config), "--kl-coef", str(kl_coef), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / SOUP_RECORD).read_text())
    assert record["scorer"].startswith("frontier_scorer(") and "kl_coef=0.04" in record["scorer"]
    assert [Path(p).name for p in record["order"]] == ["bias-2", "bias-6"]
    assert [s["kept"] for s in record["steps"]] == [True, True]
    got, bias4 = load_state(out), load_state(frontier_models / "bias-4")
    for n in bias4:
        torch.testing.assert_close(got[n], bias4[n], msg=n)

    # A separate frontier evaluation of the same weights: the candidates, each scored mixture rebuilt,
    # and the output folder, all in one run (common random numbers: each policy sees the same draws).
    policies = {str(c): c for c in candidates}
    for k, step in enumerate(record["steps"][1:]):
        policies[f"step{k}"] = uniform_soup(step["soup"], tmp_path / f"again{k}", progress=False)
    policies["out"] = out
    config = load_frontier_config(score_config)
    config.include_reference = False
    config.policies = [
        PolicySpec(name=f"p{i}", method="m", path=str(p)) for i, p in enumerate(policies.values())
    ]
    rows = dict(zip(policies, run_frontier(config, progress=False).points, strict=True))
    objective = {k: r["reward_mean"] - kl_coef * r["kl_exact_mean"] for k, r in rows.items()}
    assert [c["score"] for c in record["candidates"]] == pytest.approx(
        [objective[str(c)] for c in candidates]
    )
    for k, step in enumerate(record["steps"][1:]):
        assert step["score"] == pytest.approx(objective[f"step{k}"]), step
    assert record["score"] == pytest.approx(objective["out"])
    # The greedy rule on these scores: kept exactly when the soup beats the best so far.
    best = record["steps"][0]["score"]
    assert best == max(c["score"] for c in record["candidates"])
    for step in record["steps"][1:]:
        assert step["kept"] == (step["score"] > best)
        best = max(best, step["score"])
    assert record["score"] == best and math.isfinite(best)


def test_frontier_scorer_objective_and_cache(frontier_models, monkeypatch):
    from warpkit.frontier import scorer
    from warpkit.frontier.config import FrontierConfig

    config = FrontierConfig(reference=str(frontier_models / "sft"), prompts=PROMPTS[:2], samples_per_prompt=1,
                            max_new_tokens=4, device="cpu")  # fmt: skip
    calls = []
    real = scorer.run_frontier
    monkeypatch.setattr(scorer, "run_frontier", lambda c, **kw: calls.append(c) or real(c, **kw))
    plain, penalised = frontier_scorer(config), frontier_scorer(config, kl_coef=0.5)
    folder = frontier_models / "bias-6"
    value = plain(folder)
    assert plain(folder) == value and len(calls) == 1  # cached: same folder, unchanged files
    (c,) = calls
    assert [p.path for p in c.policies] == [str(folder.resolve())] and not c.include_reference
    row = plain.rows[str(folder.resolve())]
    assert value == row["reward_mean"]
    assert penalised(folder) == pytest.approx(row["reward_mean"] - 0.5 * row["kl_exact_mean"])
    assert row["kl_exact_mean"] > 0.1  # the penalty is not vacuous
    assert config.policies == [] and config.include_reference  # the caller's config is left alone
    with pytest.raises(ValueError, match="kl_coef=-1"):
        frontier_scorer(config, kl_coef=-1)


# ----------------------------------------------------------------------------- WARM


def test_warm_refuses_a_causal_lm_and_a_two_label_classifier(
    tiny_model_factory, tiny_tokenizer_dir, reward_models, tmp_path
):
    lm = tiny_model_factory("llama", True, 0)
    with pytest.raises(ValueError, match=r"architectures=\['LlamaForCausalLM'\], not a \*ForSequenceClass"):
        warm([reward_models[0], lm], tmp_path / "w")
    two = _reward_model(tmp_path / "two", tiny_tokenizer_dir, 3, num_labels=2)
    with pytest.raises(ValueError, match="has 2 labels"):
        warm([reward_models[0], two], tmp_path / "w")
    with pytest.raises(SystemExit, match="not a \\*ForSequenceClassification model"):
        main(
            [
                "merge",
                "--method",
                "warm",
                "--models",
                str(lm),
                str(reward_models[0]),
                "--out",
                str(tmp_path / "w"),
            ]
        )
    assert not (tmp_path / "w").exists()
    # num_labels as transformers derives it: id2label wins, else num_labels, else 2.
    cfg = json.loads((two / "config.json").read_text())
    assert "id2label" not in cfg  # transformers does not save the default 2 labels: refused as 2 above
    (two / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b", "2": "c"}}))
    with pytest.raises(ValueError, match="has 3 labels"):
        check_reward_model(two)
    (two / "config.json").write_text(json.dumps({**cfg, "num_labels": 3, "id2label": {"0": "LABEL_0"}}))
    check_reward_model(two)
    (two / "config.json").write_text(json.dumps({**cfg, "num_labels": 1}))
    check_reward_model(two)


def test_warm_output_loads_as_a_reward_model_with_the_averaged_head(warm_folder, reward_models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = AutoModelForSequenceClassification.from_pretrained(warm_folder)
    states = [load_state(f) for f in reward_models]
    assert rm.config.num_labels == 1
    torch.testing.assert_close(rm.score.weight, (states[0]["score.weight"] + states[1]["score.weight"]) / 2)
    assert not torch.equal(states[0]["score.weight"], states[1]["score.weight"])
    tokenizer = AutoTokenizer.from_pretrained(warm_folder)
    assert torch.isfinite(rm(**tokenizer(["a great movie"], return_tensors="pt")).logits).all()


def test_warm_folder_is_the_reward_of_a_frontier(warm_folder, frontier_models):
    """`reward: <warm folder>`: the rewards are the WARM model's scores of prompt + completion."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from warpkit.frontier.config import FrontierConfig
    from warpkit.frontier.policies import PolicySpec
    from warpkit.frontier.run import run_frontier

    config = FrontierConfig(
        reference=str(frontier_models / "sft"),
        policies=[PolicySpec(name="bias-6", method="m", path=str(frontier_models / "bias-6"))],
        reward=str(warm_folder), prompts=PROMPTS, samples_per_prompt=1, max_new_tokens=6, device="cpu",
    )  # fmt: skip
    result = run_frontier(config, progress=False)
    assert all(math.isfinite(p["reward_mean"]) for p in result.points)
    rm = AutoModelForSequenceClassification.from_pretrained(warm_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(warm_folder)
    for s in result.samples:
        with torch.no_grad():
            expected = rm(**tokenizer([s["prompt"] + s["completion"]], return_tensors="pt")).logits[0, 0]
        assert s["reward"] == pytest.approx(float(expected), abs=1e-4)


def test_warm_folder_is_the_reward_of_an_rl_run(warm_folder, tiny_llama_dir, tmp_path):
    """`warpkit.rl` with `reward_funcs: [<warm folder>]`: TRL loads it as a reward model; one RLOO step
    (about 7 s on one CPU core, so not marked slow)."""
    from warpkit.loop.rl import build_trainer, parse_args

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    argv = [
        "--model_name_or_path", str(tiny_llama_dir), "--reward_funcs", str(warm_folder),
        "--dataset", str(prompts), "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "6",
        "--beta", "0.1", "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
        "--save_strategy", "no", "--logging_steps", "1", "--seed", "0",
    ]  # fmt: skip
    trainer = build_trainer(*parse_args(argv))
    reward_model = trainer.reward_funcs[0]
    torch.testing.assert_close(reward_model.score.weight.detach(), load_state(warm_folder)["score.weight"])
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "reward" in h)
    assert math.isfinite(logged["reward"]) and trainer.state.global_step == 1


# ----------------------------------------------------------------------------- bad input


WRONG_COMBINATIONS = [
    (["--method", "greedy_soup"], "needs exactly one of --scorer"),
    (["--method", "greedy_soup", "--scorer", "tests.merge.scorers:table_score", "--score-config", "x.yaml"],
     "got both"),
    (["--method", "greedy_soup", "--scorer", "tests.no_such_module:f"], "cannot be imported"),
    (["--method", "greedy_soup", "--scorer", "tests.merge.scorers:no_such_fn"], "cannot be imported"),
    (["--method", "greedy_soup", "--scorer", "tests.merge.scorers:NOT_CALLABLE"], "is not callable"),
    (["--method", "greedy_soup", "--scorer", "tests.merge.scorers:table_score", "--scores", "1", "2"],
     "--scores has 2 values for 3 --models"),
    (["--method", "greedy_soup", "--scorer", "tests.merge.scorers:table_score", "--kl-coef", "0.1"],
     "--kl-coef is the KL penalty"),
    (["--method", "greedy_soup", "--scorer", "tests.merge.scorers:table_score", "--weights", "1", "1", "1"],
     "takes no --weights"),
    (["--method", "soup", "--scorer", "tests.merge.scorers:table_score"], "only apply to --method greedy_soup"),
    (["--method", "slerp", "--init", "TMP/a", "--scores", "1", "2", "3"], "only apply to --method greedy"),
    (["--method", "soup", "--init", "TMP/a"], "takes no --init"),
    (["--method", "soup", "--liti-eta", "0.3"], "--liti-eta do not apply to --method soup"),
    (["--method", "greedy_soup", "--score-config", "TMP/missing.yaml"], "does not exist"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), WRONG_COMBINATIONS, ids=[m for _, m in WRONG_COMBINATIONS])
def test_cli_refuses_wrong_combinations(tiny_model_factory, tmp_path, extra, message):
    a, b, c = (tiny_model_factory("gpt2", True, s) for s in (0, 1, 2))
    out = tmp_path / "out"
    base = ["merge", "--models", str(a), str(b), str(c), "--out", str(out), "--no-progress"]
    extra = [str(tmp_path / e.removeprefix("TMP/")) if e.startswith("TMP/") else e for e in extra]
    if message == "does not exist":  # FileNotFoundError: main prints it and returns 2
        assert main([*base, *extra]) == 2
    else:
        with pytest.raises(SystemExit, match=message):
            main([*base, *extra])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_soup_without_models(tmp_path):
    with pytest.raises(SystemExit, match="missing --models"):
        main(["merge", "--method", "soup", "--out", str(tmp_path / "out")])


def test_soups_refuse_a_lora_adapter_and_mixed_architectures(tiny_model_factory, tmp_path):
    a = tiny_model_factory("gpt2", True, 0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a LoRA adapter"):
        uniform_soup([a, adapter], tmp_path / "s")
    llama = tiny_model_factory("llama", True, 0)
    with pytest.raises(ValueError, match="model_type='llama' but"):
        uniform_soup([a, llama], tmp_path / "s")


def test_greedy_soup_config_yaml_keys(tiny_model_factory, tmp_path):
    """The --config YAML takes the greedy keys too (scorer, scores); flags still win."""
    import yaml

    folders = {n: Path(shutil.copytree(tiny_model_factory("gpt2", True, s), tmp_path / n)) for n, s in
               (("A", 0), ("B", 1), ("C", 2))}  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "greedy_soup", "models": [str(folders[n]) for n in "ABC"], "out": str(tmp_path / "soup"),
        "scorer": "tests.merge.scorers:table_score", "scores": [0.7, 0.9, 0.8],
    }))  # fmt: skip
    soup_scorers.CALLS.clear()
    assert main(["merge", "--config", str(recipe), "--no-progress"]) == 0
    assert soup_scorers.CALLS == ["B,C", "A,B,C"]
    record = json.loads((tmp_path / "soup" / SOUP_RECORD).read_text())
    assert [Path(p).name for p in record["ingredients"]] == ["B", "C"]


def test_cli_soup_weights_follow_the_extrapolation_rule(tiny_model_factory, tmp_path, capsys):
    """The help says --allow-extrapolation is what allows negative weights: true for soups as for lerp."""
    a, b = tiny_model_factory("gpt2", True, 0), tiny_model_factory("gpt2", True, 1)
    args = ["merge", "--models", str(a), str(b), "--weights", "3", "-1", "--no-progress"]
    for method in ("soup", "warm"):  # warm is refused for the weights before its reward-model checks
        with pytest.raises(SystemExit, match=rf"^warpkit merge: {method} weights \[3\.0, -1\.0\] include "
                           r"negative values: .* or pass --allow-extrapolation if that is intended\.$"):  # fmt: skip
            main([*args, "--method", method, "--out", str(tmp_path / method)])
    assert main([*args, "--method", "soup", "--out", str(tmp_path / "soup"), "--allow-extrapolation"]) == 0
    got, sa, sb = load_state(tmp_path / "soup"), load_state(a), load_state(b)
    for n in got:
        torch.testing.assert_close(got[n], (1.5 * sa[n].double() - 0.5 * sb[n].double()).float(), msg=n)
    with pytest.raises(SystemExit, match=r"greedy_soup takes no weights and no init, so --allow-extrapolation "
                       r"has nothing to allow; drop --allow-extrapolation\."):  # fmt: skip
        main(["merge", "--method", "greedy_soup", "--models", str(a), str(b), "--scorer",
              "tests.merge.scorers:table_score", "--allow-extrapolation", "--out", str(tmp_path / "g")])  # fmt: skip
    assert not (tmp_path / "g").exists() and not (tmp_path / "warm").exists()

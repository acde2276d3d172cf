"""process_docs for hellaswag_local: the stock task's, for the local file's fields.

The stock `hellaswag` task builds `query` from `ctx_a`/`ctx_b`, which the local file does
not have: its `query` is already built and preprocessed. Preprocessing it again is not a
no-op, so only the endings go through the stock `preprocess`.
"""

from lm_eval.tasks.hellaswag.utils import preprocess


def process_docs(dataset):
    return dataset.map(lambda doc: {"choices": [preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])})

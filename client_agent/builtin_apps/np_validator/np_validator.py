"""The demonstration validator of a NumPy cross-site evaluation without a script of its own
(``NumpyCrossSiteEvalRecipe(eval_script=None)``, as NVFlare's ``NPValidator``): it scores a
model by ``sum(x / max(x))`` of its ``numpy_key`` array. Unlike NVFlare's, it adds no random
number, so the same model gets the same score at every site. For trying the workflow, not for
judging a model."""

import numpy as np

import client_agent.api as flare
from client_agent.fl_model import NPConstants

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None or model.params is None:
        break
    array = np.asarray(model.params[NPConstants.NUMPY_KEY], dtype=np.float64)
    peak = float(np.max(array))
    score = float(np.sum(array / peak)) if peak else 0.0
    flare.send(flare.FLModel(metrics={"accuracy": score}))

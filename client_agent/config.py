"""NVFlare's exchange settings for a job (``nvflare.client.config`` and
``nvflare.apis.dxo.DataKind``), and the task meta keys that carry them to the script.

A recipe's ``params_transfer_type=TransferType.DIFF`` reaches each train task as
``meta[TRANSFER_TYPE_META_KEY] == "DIFF"``: the Client API then sends ``local − received``
for a FULL ``FLModel`` (NVFlare's ``flare.send`` does the same). A NumPy job
(``NumpyFedAvgRecipe``) sets ``meta[EXCHANGE_FORMAT_META_KEY] == "numpy"``: the script
receives numpy arrays instead of torch tensors. ``exclude_vars`` reaches each train task as
``meta[EXCLUDE_VARS_META_KEY]``: the Client API leaves the matching params out of what it
sends, so they never leave the site.
"""

from __future__ import annotations

from enum import StrEnum


class ExchangeFormat(StrEnum):
    """How params are handed to the script: NVFlare's names and values."""

    RAW = "raw"
    PYTORCH = "pytorch"
    NUMPY = "numpy"
    KERAS_LAYER_WEIGHTS = "keras_layer_weights"


class TransferType(StrEnum):
    """Whether a site sends its weights (FULL) or their change this round (DIFF)."""

    FULL = "FULL"
    DIFF = "DIFF"


class DataKind(StrEnum):
    """NVFlare's ``DataKind``: the recipes read ``WEIGHTS`` and ``WEIGHT_DIFF``
    (``aggregator_data_kind``); the other members exist so that a job naming them imports."""

    FL_MODEL = "FL_MODEL"
    WEIGHTS = "WEIGHTS"
    WEIGHT_DIFF = "WEIGHT_DIFF"
    METRICS = "METRICS"
    ANALYTIC = "ANALYTIC"
    COLLECTION = "COLLECTION"
    STATISTICS = "STATISTICS"
    PSI = "PSI"
    APP_DEFINED = "APP_DEFINED"


# Task meta keys the workflows set and the Client API reads.
TRANSFER_TYPE_META_KEY = "params_transfer_type"
EXCHANGE_FORMAT_META_KEY = "exchange_format"
# A regular expression: params whose names it matches (``re.search``) are not sent.
EXCLUDE_VARS_META_KEY = "exclude_vars"
# In a result a site's agent sent: what the site's privacy policy did and spent
# (``client_agent.privacy``); its ``excluded`` lists the tensors the site kept, which the
# server counts as no change from that site.
PRIVACY_META_KEY = "fedportal.privacy"

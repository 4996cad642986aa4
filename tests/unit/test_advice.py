"""Right-sizing advice reads like the seed's examples and never suggests below the observed peak."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from budget.advice import advise

pytestmark = pytest.mark.unit

GI = 2**30


@pytest.mark.parametrize(
    ("declared", "peak", "utilization", "recommendation", "hint"),
    [
        pytest.param(80 * GI, 75 * GI, 93, "Consider reducing memory to 78Gi for better packing",
                     "model-a declared 80Gi but observed peak is 75Gi (6% overprovisioned)", id="seed-model-a"),
        pytest.param(60 * GI, 58 * GI, 96, "Declared memory matches observed usage", None, id="seed-model-b-close"),
        pytest.param(16 * GI, 18 * GI, 112, "Observed peak exceeds declared memory: raise memory to 19Gi to avoid OOM",
                     "model-a declared 16Gi but observed peak is 18Gi (13% underprovisioned)", id="under"),
        pytest.param(4 * GI, 1 * GI, 25, "Consider reducing memory to 1280Mi for better packing",
                     "model-a declared 4Gi but observed peak is 1Gi (75% overprovisioned)", id="small-model-mi-steps"),
        pytest.param(8 * GI, 0, 0, "Consider reducing memory to 256Mi for better packing",
                     "model-a declared 8Gi but observed peak is 0 (100% overprovisioned)", id="nothing-observed"),
    ],
)
def test_advice_table(declared, peak, utilization, recommendation, hint):
    a = advise("model-a", declared, peak)
    assert a.utilization_percent == utilization
    assert a.recommendation == recommendation
    assert a.hint == hint


def test_bad_input_names_the_model():
    with pytest.raises(ValueError, match="model-x"):
        advise("model-x", 0, 1)
    with pytest.raises(ValueError, match="model-x"):
        advise("model-x", GI, -1)


@given(declared=st.integers(1, 2**44), peak=st.integers(0, 2**44))
def test_never_recommends_less_than_the_peak(declared, peak):
    a = advise("m", declared, peak)
    if a.recommendation_bytes is not None:
        assert a.recommendation_bytes >= peak

"""The table of strategy kinds is the one source the hooks, the registry and params read."""

from __future__ import annotations

import inspect

from unbottle.core.config.schema import Params
from unbottle.core.config.strategy_checks import strategy_refs
from unbottle.core.contract import hookspecs
from unbottle.core.contract.kinds import KINDS, STEP_KINDS


def test_every_kind_has_its_documented_hook_and_work_methods():
    for kind in KINDS.values():
        spec = getattr(hookspecs, kind.hook)
        assert getattr(spec, "unbottle_spec", None) is not None, kind.hook
        assert list(inspect.signature(spec).parameters) == ["register"]
        assert spec.__doc__ == kind.doc and kind.doc.startswith("Register ")
        assert kind.methods, kind.name  # a protocol with no work method checks nothing


def test_params_name_every_kind_where_the_table_says():
    params = Params.model_validate(
        {
            "pretrain": {"source": {"path": "model.gguf"}, "continued": {}},
            "compress": {"variants": {"v": [{"prune": "magnitude"}, {"quantize": "rtn"}]}},
        }
    )
    places = {(where, kind) for where, kind, _, _ in strategy_refs(params)}
    expected = {
        (path.replace("[]", "[0]"), kind.name) for kind in KINDS.values() for path in kind.params
    }
    assert expected <= places
    assert {("compress.variants.v[0]", "pruning"), ("compress.variants.v[1]", "quantization")} <= (
        places
    )
    assert set(STEP_KINDS.values()) == {k.name for k in KINDS.values() if k.step}

"""The one NAME[:key=value,...] parser (sdinfer.specs) for samplers, caches and strategies."""

import pytest

from sdinfer import cache, parallel
from sdinfer.specs import guess_value, parse_config, parse_spec, split_spec


def test_values_are_typed_by_their_look():
    assert parse_spec("DDIM:eta=0.5,flag=TRUE,order=3,name=x") == \
        ("ddim", {"eta": 0.5, "flag": True, "order": 3, "name": "x"})
    assert [guess_value(v) for v in ("false", "2", "2.0", "1e-3", "abc")] == [False, 2, 2.0, 1e-3, "abc"]
    assert parse_spec("euler") == ("euler", {})


@pytest.mark.parametrize("spec, words", [
    ("ddim:eta", "sampler option 'eta' must look like key=value"),
    ("ddim:=1", "must look like key=value"),
    ("ddim:eta=1,eta=2", "'eta' is given twice"),
])
def test_malformed_options_are_clear_errors(spec, words):
    with pytest.raises(ValueError, match=words):
        split_spec(spec, "sampler")


def test_configs_take_their_defaults_types():
    config = parse_config("fora:interval=2", cache.METHODS, "cache method")
    assert config == cache.FORAConfig(interval=2) and isinstance(config.interval, int)
    with pytest.raises(ValueError, match="unknown cache method 'nope'; available: .*fora"):
        parse_config("nope", cache.METHODS, "cache method")
    with pytest.raises(ValueError, match="fora has no option 'step'; its options: interval"):
        parse_config("fora:step=2", cache.METHODS, "cache method")
    with pytest.raises(ValueError, match="fora option interval='two' is not a int"):
        parse_config("fora:interval=two", cache.METHODS, "cache method")
    with pytest.raises(ValueError, match="fora interval must be a whole number >= 1, got 1.5"):
        parse_config("fora:interval=1.5", cache.METHODS, "cache method")


def test_cache_compatibility_is_declared_by_the_configs():
    assert parallel.caches_under("cfg") == cache.exact_parallel_methods("cfg")
    assert set(cache.exact_parallel_methods("cfg")) == \
        {*cache.exact_parallel_methods(), "ditfastattn", "linfusion"}   # those two not under sequence parallelism
    assert "ditfastattn" not in parallel.caches_under("ulysses") + parallel.caches_under("cfg+ring")
    assert "linfusion" not in parallel.caches_under("ulysses")
    assert "tgate" not in cache.exact_parallel_methods() and "fora" in cache.exact_parallel_methods()
    assert parallel.caches_under("pipefusion") == () and parallel.caches_under("cfg+distrifusion") == ()
    assert parallel.caches_under("cfg+ulysses") == cache.exact_parallel_methods("cfg+ulysses") == \
        cache.exact_parallel_methods()

import pytest

from models.config import load_config
from server.secagg import SecAggConfigError, choose_secagg


@pytest.mark.parametrize("n_banks", [3, 4, 5, 8, 10, 25, 100, 1000])
def test_shares_are_odd_or_everyone_and_threshold_below_shares(n_banks):
    params = choose_secagg(n_banks, load_config().federation)
    assert 2 < params.num_shares <= n_banks
    assert params.num_shares == n_banks or params.num_shares % 2 == 1
    assert 1 < params.reconstruction_threshold < params.num_shares
    assert n_banks * params.quantization_range < params.modulus_range
    assert params.num_shares <= params.modulus_range / params.quantization_range


def test_refusals_name_the_key():
    config = load_config().federation
    with pytest.raises(SecAggConfigError, match="overflow"):
        choose_secagg(1024, config)  # 1024 * 2**22 == 2**32: the sum could wrap
    with pytest.raises(SecAggConfigError, match="at least 3"):
        choose_secagg(2, config)
    with pytest.raises(SecAggConfigError, match="secagg-num-shares"):
        choose_secagg(5, load_config({"secagg-num-shares": 9}).federation)
    with pytest.raises(SecAggConfigError, match="secagg-reconstruction-threshold"):
        choose_secagg(
            5, load_config({"secagg-num-shares": 5, "secagg-reconstruction-threshold": 5}).federation
        )


def test_quantization_error_bound_shrinks_with_range():
    small = choose_secagg(10, load_config().federation)
    large = choose_secagg(10, load_config({"secagg-quantization-range": 2**26}).federation)
    assert large.max_error(10) < small.max_error(10) / 10

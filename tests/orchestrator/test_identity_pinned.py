"""Identity by what counts (issue 15): every run key of the shipped sweeps and every column `adareg schedule`
prints for every Table 1 scheme are pinned to their values before learning-rate families and tapers existed.

The expected values were computed from commit 580f64c (before the change) and are stored here; a change to any
key, group or printed schedule value fails this test."""

from __future__ import annotations

import hashlib

import pytest

from orchestrator.cli import main
from orchestrator.sweep.expand import expand
from orchestrator.sweep.file import load_sweep

PINNED_KEYS = {
    "sweeps/table1.yaml": (
        "006c0b314c9d", "029979c4dd33", "0299cf65496a", "02f1cd22e240", "03bb4b16fa8c", "041a894381a7",
        "06ae44bd7e95", "06d2758f98a5", "0964cf96f32c", "097101fd2abe", "0aea3eb5808c", "0b87d6335d07",
        "0de4f22960d5", "0fb42bda2ce2", "105bc3e79965", "11929d4139c2", "15636a86ad14", "16f78de09135",
        "1747319f9c54", "195a80c205c2", "1b12f355ad92", "1b15160cfaaf", "1b9a7b5a2ff8", "1c05be03917f",
        "1cc795178b7d", "1d0dc546493c", "1f3d81a7ee1f", "2070eaa6944a", "21df3c8f799e", "234316b2a8be",
        "27ac19a568a9", "28ea259ca342", "2a76cc47ef01", "2c54aeb9f47e", "2c7a031f230a", "2cf0dc6d007a",
        "308c73561443", "30d0a3a29341", "3137f314ace5", "325bf9201a49", "32b488c24957", "33ddef020b0b",
        "347f73c1b54d", "349a4bb0873b", "35420a1fe988", "37cc0d1c27d4", "3803d9166813", "387452c91827",
        "39d5f376ae43", "3a1ec1002d6f", "3ce664df4055", "3e6988b52137", "3edc04f6349b", "433e3fa15423",
        "45b0f9e973ec", "497efe1bac54", "4b58299fab96", "4e40cbae1b3a", "4f8c3be38275", "5038154042e1",
        "519fa170968f", "5361ca9e6f30", "54ce69254b5f", "551f85c515db", "56a32a96449f", "5864eb646e07",
        "5907760615fc", "59f4b6905423", "5bea85015d42", "5c25eb959ff2", "5ca9b7168bf6", "5dfd5ec926f2",
        "60ef408a0fd3", "61383331779f", "62e9aaf82277", "639ababc6c1a", "64f3bce28bc2", "65d785f03e17",
        "65f7c57cad17", "6648bb04e653", "6ac6ef1427ed", "6c40459d93b4", "6cd474177dae", "6d316070ef27",
        "6d439a8cec22", "6f8c172722f6", "72c7b47d4507", "72eaed999824", "7309fb781540", "74115e73e91a",
        "74a9b3e525c1", "751c998dbb59", "76fa8d75c5b5", "7782c3caba4c", "79f433dd47ea", "7a4239d4902c",
        "7a587f36dad4", "7ba8b9cdd1c0", "7bc4fe89ddc9", "7c9f0b301685", "7d767c5ae785", "7fa17221ba0b",
        "8036fd4d53f0", "82c6486cd9f6", "8313627a463f", "837a31dc059e", "83adcc924042", "8437ad1f06bd",
        "84a271bd1ef6", "85a6034128d3", "85ed28538bb2", "8a432417f759", "8d946f54bebb", "8f8b4e9199ea",
        "916095158e00", "92568914ccd0", "93ff5dfb5bc0", "953834f723e4", "969705dabd74", "9af1b94152a5",
        "9b950bcaca1a", "9bf502dbcfdb", "9f1e6f1d9839", "a14bb24fd4fc", "a1b4386db21d", "a36e9b73bd7b",
        "a51422099f68", "a6b1ca901fdb", "aa6dbe2a085b", "ac0b4cb46714", "ac663011b23c", "addd4fdc2d2b",
        "b04a13752b79", "b0d4b9910f5c", "b0e643e63879", "b1c2cf50fa45", "b271921d4d23", "b4bd9c8ffdac",
        "b50c0d08b81f", "b62db655e7c5", "b825ef92ae6d", "b8872f81f7d9", "ba04dfcfb16d", "ba786b84af1e",
        "ba9ce7213ccc", "baae87e96dca", "be5e852004f4", "bf16c4022a7b", "bf4296df0f05", "bf861c581675",
        "c1648db522e8", "c1c32afc245c", "c24a6673348a", "c30f293ff648", "c490d017728b", "c6d351ef4df6",
        "c85808e8be99", "c8954aaf9af4", "c955a0aafa9b", "c9af0e1a0f5b", "cad240fcb043", "cb047a594cb9",
        "cd63901efdd9", "d8a315dfa9c9", "d8f6dc56ca70", "d948ad4967a0", "da062bef2523", "da0f96ac30cb",
        "da8fd36aa58d", "db39c54884b3", "db410d5991d7", "dcc0231c10c5", "dea4296ca324", "e050a03e8cc4",
        "e1d064d87949", "e43d3612c5c7", "e6898d8be282", "e7727f84367c", "e79da9cacea1", "e7fd08719bfc",
        "e8bd3e082e84", "ebcd65300ca7", "eebaf1f66dcb", "ef3719a2ad46", "f1098888e6a7", "f173c4438f7e",
        "f1dd88680f4c", "f1ddc70ee5c0", "f3f029d585da", "f5b5f74a0b21", "f63f0b9027b2", "f75e88312e2a",
        "f8dd6025291d", "f8e502a596ec", "fba8662a6960", "fbfb372adf37", "fe2c3d6ee6fa", "fea4c66c9500",
        "fec253c60f28", "ff4cb4539aa9",
    ),
    "sweeps/demo.yaml": (
        "08f2138c009c", "093ba548aa45", "26f6cc0acfeb", "4d8d7f316d85", "562ded75190b", "63990f030d22",
        "6ce0688f073c", "9b2d34187272", "a8b7d9ec1ffd", "e3473e11f74e",
    ),
    "sweeps/tune.yaml": (
        "186f302e6aa4", "194f507b951e", "4ac938aefdbb", "4add3c4f29dd", "5c7fcafda336", "603bff4dd1d6",
        "64a21e8f15a5", "91a1a865cac8", "a2873dba8072", "c70d329df44b", "ca6c824ba779", "ed0b9abbdb16",
    ),
}
PINNED_GROUPS = {
    "sweeps/table1.yaml": (
        "04156f121126", "08b98871e42a", "0e0a464e03ed", "126b9be7e5c0", "15a7bf80719b", "19f0adc550d6",
        "1d5f680bea64", "1e2e654f718a", "200e73c7cf42", "274f32e5c0d6", "2b8bf3263c6c", "4339da079389",
        "4844a8993b4a", "4b66f9aa9a8b", "54316ec1a56a", "54f4c20cbadf", "5c1e199cd774", "7407df633ce0",
        "77db59b7324e", "7e0161e378eb", "7fff0b69f6ec", "9a2ad0bce8d0", "9baa78fc478b", "9f1284f4e9f3",
        "a3e824fff15f", "ae35d959e90d", "b4b08d005066", "b6940564a84e", "b99026e9bc79", "b9e362b41010",
        "c0db5d54b31e", "c30991482e20", "c64d6fc9a1fc", "c6f75d15f9c4", "c7296f0a93d6", "cbcfbc90a286",
        "d1dbaf1deba3", "e94a33bfd444", "fe3495e84708", "ff3679816c48",
    ),
    "sweeps/demo.yaml": (
        "1e83422b6ef0", "20bbd739cc3a", "527f4d673da5", "9a1b1906fcc4", "fcff7ce7a3a0",
    ),
    "sweeps/tune.yaml": (
        "147065ff2af0", "405feb05ada6", "4d0a8ba756c6", "b98b180054ff",
    ),
}
SCHEDULE_CSV_SHA256 = {  # scheme@epochs_scale -> sha256 of `adareg schedule SCHEME --format csv` of table1
    "01@1": "8ee12b912204f384589ad46b032ee5f77a97be60170f65664351fbbf270d8b01",
    "01@0.04": "8de33a339aabddf5a2bc9efa33241b2dbbdb87eb68e2d1e9aed1b8fc40ee705a",
    "02@1": "75f5a2b389da4d0fcd1c0ef0d9c46eddd323fd66c5c8cb04756954cee1aa2b35",
    "02@0.04": "de54833e2dec9134b56ea533b6669089e0823b4eece61c9ac16fe38c4ed246fc",
    "21@1": "2b2d0b8aa256dc54f67600cc3bd5acb5bb95c71c56930405697631e9a467b897",
    "21@0.04": "a6a46c564e5b02cd82ee468d431fb64c2c2ba2832fa0552959e0fd712309d6f9",
    "22@1": "48530bff73058290a9a959283a681ab5e33c2367ff3011236f746de09bdf7795",
    "22@0.04": "5a79e6d9219b857762103cfcf5b7cea589f83acb4daad4db057630a789cd3997",
    "23@1": "93b513f35764e4e1c2ecd27a5ad0b05ce3d5a2c876efebbde797ecafc6113381",
    "23@0.04": "0c2be3380030d6a950a6e7e6c18b1834378d684c7369ee4d444a3b682ee5cd81",
    "wd-1e-4@1": "2342d53b2a3f24dcf23aa4a2a480b05e1ffe7091ea2007e42cd4ed7681f20006",
    "wd-1e-4@0.04": "be57c06fad22402f91096bb3f91c2f0f6dfd7fc51eaebe78ababee0440bff8a5",
    "wd-1e-3@1": "5192c76207fccd7831f83a0bdb43cdc3eb6665c147c55a3c1189a75de1dcfcc9",
    "wd-1e-3@0.04": "941c83300bd87711476e4fff7d9e148930d22da3529f4ab3d160a62ca9c6681f",
    "wd-2e-3@1": "d84e58e94170c61afd3c0e3445af8a30abb04472fba8ce03ccf9af1fd0270bff",
    "wd-2e-3@0.04": "d9339eb73de829d8b60f33b32bbf6fdcfc74e13953c534807ad96d1295d57fc3",
    "wd-4e-3@1": "42673bfee967c78d3fd6e0bc84b7108e144e1c2931281e05ba2899e8e2d848b1",
    "wd-4e-3@0.04": "4068eae6bf1c45698ff9abd5285f2159a231696e22f0e64edd710a8c191b3e61",
    "wd-8e-3@1": "e35a67109432d8cba784442dce87901d787af66a176220be851a38913f36f101",
    "wd-8e-3@0.04": "197655987bfd0b46c3553332635f4aea2407ba8d84b5b5e2264c3bbcfeca8391",
}


@pytest.mark.parametrize("path", sorted(PINNED_KEYS))
def test_run_keys_and_groups_are_unchanged(path):
    runs = expand(load_sweep(path))
    assert sorted(r.key for r in runs) == list(PINNED_KEYS[path])
    assert sorted({r.group for r in runs}) == list(PINNED_GROUPS[path])


@pytest.mark.parametrize("case", sorted(SCHEDULE_CSV_SHA256))
def test_schedule_columns_are_unchanged(case, capsys):
    """Today's columns value for value: epoch, phase, lr, weight_decay, grad_sparsity of every Table 1 scheme."""
    scheme, scale = case.split("@")
    args = ["schedule", scheme, "--sweep", "sweeps/table1.yaml", "--format", "csv"]
    if scale != "1":
        args += ["--epochs-scale", scale]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "epoch,phase,lr,weight_decay,grad_sparsity"
    assert hashlib.sha256(text.encode()).hexdigest() == SCHEDULE_CSV_SHA256[case]

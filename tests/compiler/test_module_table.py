"""`module_table` is `dict(named_modules())` (order, first names of shared modules, None children
skipped) and `parameter_count` counts shared parameters once, like `parameters()`."""

from torch import nn

from reparam.module_table import module_table, parameter_count


def _model() -> nn.Module:
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), nn.ModuleList([nn.Linear(3, 3), shared]),
                          nn.ModuleDict({"b": nn.BatchNorm2d(3), "a": nn.Identity()}))
    model.add_module("missing", None)
    model.tied = nn.Linear(3, 3)
    model.tied.weight = model[1][0].weight  # a parameter shared between two modules
    return model


def test_module_table_is_named_modules():
    model = _model()
    assert list(module_table(model).items()) == list(model.named_modules())


def test_parameter_count_counts_shared_parameters_once():
    model = _model()
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())

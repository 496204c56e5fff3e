"""The deliberate defects of the mutation check (tests/mutations.py) still have their targets.

scripts/mutation_check.py runs the tests with each defect applied; if a refactoring renames a
function a defect replaces, this test says which one to re-point, instead of the check failing
later or, worse, testing nothing.
"""

import mutations


def test_every_defect_has_its_target():
    missing = {name: why for name, why in mutations.check_targets().items() if why}
    assert not missing, missing


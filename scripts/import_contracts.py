"""An import-linter contract type: no import cycle between modules (``lint-imports``).

import-linter's own ``acyclic_siblings`` forbids cycles between *packages* (every import of a
package's descendants counted as the package's); Atrium's rule is the one between modules (see
docs/decisions/0014-import-rules.md), so this contract walks grimp's module graph instead: for
each direct import ``a -> b`` it asks for the shortest chain back from ``b`` to ``a``.

Configured in pyproject.toml (``[tool.importlinter]``); ``ignore_imports`` names the imports of
known cycles still waiting for their fix, and an entry that no longer matches fails the check,
so the list only shrinks.
"""

from __future__ import annotations

import grimp
from importlinter import Contract, ContractCheck, fields, output
from importlinter.application import contract_utils
from importlinter.application.contract_utils import AlertLevel


class NoCyclesContract(Contract):
    """No module may import itself back through a chain of imports (a cycle)."""

    type_name = "no_cycles"

    ignore_imports = fields.SetField(subfield=fields.ImportExpressionField(), required=False)

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        removal = contract_utils.remove_ignored_imports_and_report(
            graph=graph,
            ignore_imports=self.ignore_imports,  # type: ignore[arg-type]
            unmatched_alerting=AlertLevel.ERROR,
        )
        cycles: set[tuple[str, ...]] = set()
        for importer in sorted(graph.modules):
            for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                back = graph.find_shortest_chain(importer=imported, imported=importer)
                if back:
                    cycles.add(_canonical((importer, *back[:-1])))
        return ContractCheck(
            kept=not cycles,
            warnings=list(removal.warnings),
            ignored_import_count=removal.ignored_import_count,
            metadata={"cycles": sorted(cycles)},
        )

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(" -> ".join((*cycle, cycle[0])))
            output.new_line()


def _canonical(cycle: tuple[str, ...]) -> tuple[str, ...]:
    # One cycle is found once per import in it: start each at its smallest module name.
    start = cycle.index(min(cycle))
    return cycle[start:] + cycle[:start]

"""Shared test set-up: tests live by stage (engine, collect, store, analysis, report,
integrations); helpers used by more than one stage sit here, on the import path."""

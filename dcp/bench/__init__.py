"""The `dcp bench` harness: the article's figures measured against reference targets."""

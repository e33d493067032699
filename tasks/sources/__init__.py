"""Where rows are looked up: one module per REST source."""

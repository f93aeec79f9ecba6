"""A running lamabus node: its service, API, intake, publisher and cluster membership."""

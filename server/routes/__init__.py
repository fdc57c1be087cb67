"""HTTP routes: a few lines each, parse -> serving -> response."""

"""One module per subcommand, each a thin layer over the library modules."""

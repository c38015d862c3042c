from corepipe.cli import main

raise SystemExit(main())

from ksmlens.cli.main import main

raise SystemExit(main())

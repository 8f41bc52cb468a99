from ksmlens.cli import main

raise SystemExit(main())

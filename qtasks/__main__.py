from qtasks.cli import main

raise SystemExit(main())

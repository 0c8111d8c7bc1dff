from dreamd.cli import main

raise SystemExit(main())

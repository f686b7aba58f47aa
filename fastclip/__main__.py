from fastclip.cli import main

raise SystemExit(main())

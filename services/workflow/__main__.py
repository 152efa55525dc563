"""``python -m services.workflow``: the workflow engine."""

from services.workflow.app import main

if __name__ == "__main__":
    main()

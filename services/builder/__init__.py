"""The builder: consumes code commits, fetches the pushed commit with git, installs requirements, stores artifacts."""

"""Alembic's environment for the feedback store: always run from `feedback.store.migrate` on a connection
it has already opened (and locked), never from an alembic.ini."""

from alembic import context

context.configure(connection=context.config.attributes["connection"], target_metadata=None)
with context.begin_transaction():
    context.run_migrations()

"""Provider adapters: the one interface the node uses to drive an inference engine."""

"""Getting runs onto devices: slots, packs, backends, the scheduler, progress views and the one launch path."""

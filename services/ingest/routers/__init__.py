"""One router per resource; each is thin and calls the shared layer below (deps, records,
uploads, queue), never another router."""

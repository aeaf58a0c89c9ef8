"""A Think2Drive-like bird's-eye-view (BEV) rasteriser, independent of any simulator.

Think2Drive (Li et al., ECCV 2024, arXiv 2402.16720, Sec. 3.1 and Fig. 3) feeds the planner a stack of
binary BEV masks in the ego frame: road, lane lines, route, ego, and the dynamic objects at several
past timesteps. This module draws such a stack from plain geometry:

* the static map as straight :class:`Segments` (lane centrelines with their half widths and the types
  of the two boundary lines), built once per map by the simulator adapter;
* the ego route as another :class:`Segments` (the route's lanes, clipped at the route's end);
* oriented boxes ``(x, y, heading, length, width)`` for the ego, the other vehicles (one array per
  past frame) and static obstacles.

Image convention: the ego looks *up* the image (row 0 is the farthest point ahead), image columns
grow to the ego's *right*, the ego's centre sits at column ``size / 2`` and row ``ego_row`` (default
``size / 2``, the centre; :class:`~lightning_eff.rl.envs.HighwayBEVEnv` puts it at ``3/4 size`` to see
three times farther ahead than behind). Pixel ``(i, j)`` samples the world at its centre, so a box
covers a pixel iff the pixel centre lies in the box (no anti-aliasing: masks are binary, as in the
paper). Boxes are drawn at least one pixel long and wide (``min_extent``), so that a 2 m wide car is
never lost between two pixel centres at a resolution coarser than 2 m/pixel.

World convention (that of highway-env): a heading ``h`` points along ``(cos h, sin h)`` and the
lateral direction of a lane is its direction turned by +90 degrees, ``(-sin h, cos h)``; line type 0
of a lane is drawn at lateral ``-w/2``, line type 1 at ``+w/2``. Turning by +90 degrees from the
heading is the ego's right in this convention (highway-env draws ``y`` downwards), so the lateral
axis maps to image columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightning_eff.utils.checks import check_int

__all__ = [
    "LINE_NONE",
    "LINE_STRIPED",
    "LINE_SOLID",
    "Segments",
    "StaticRaster",
    "BEVRasterizer",
    "polyline_segments",
    "colorize",
]

#: Lane-boundary line types (highway-env's ``LineType``: NONE 0, STRIPED 1, CONTINUOUS 2, CONTINUOUS_LINE 3).
LINE_NONE, LINE_STRIPED, LINE_SOLID = 0, 1, 2

#: Dash pattern of striped lines [m] (highway-env's ``LaneGraphics``: 3 m stripes every 4.33 m).
STRIPE_PERIOD, STRIPE_LENGTH = 4.33, 3.0


@dataclass
class Segments:
    """Straight pieces of lane centrelines.

    Attributes:
        start: ``[S, 2]`` world start points.
        end: ``[S, 2]`` world end points.
        half_width: ``[S]`` half lane width [m].
        s0: ``[S]`` longitudinal coordinate of ``start`` along its lane [m] (phase of the dash pattern).
        lines: ``[S, 2]`` boundary line types at lateral ``-w/2`` and ``+w/2`` (``LINE_*``; any value >= 2
            is solid).
        t_max: ``[S]`` fraction of each segment that is drawn (1 everywhere except a clipped route end).

    Example::

        >>> seg = polyline_segments(np.array([[0.0, 0.0], [10.0, 0.0]]), half_width=2.0)
        >>> len(seg), seg.half_width.tolist()
        (1, [2.0])
    """

    start: np.ndarray
    end: np.ndarray
    half_width: np.ndarray
    s0: np.ndarray
    lines: np.ndarray
    t_max: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.start = np.asarray(self.start, dtype=np.float64).reshape(-1, 2)
        self.end = np.asarray(self.end, dtype=np.float64).reshape(-1, 2)
        n = len(self.start)
        self.half_width = np.broadcast_to(np.asarray(self.half_width, dtype=np.float64), (n,)).copy()
        self.s0 = np.broadcast_to(np.asarray(self.s0, dtype=np.float64), (n,)).copy()
        self.lines = np.broadcast_to(np.asarray(self.lines, dtype=np.int64).reshape(-1, 2), (n, 2)).copy()
        t_max = np.ones(n) if self.t_max is None else self.t_max
        self.t_max = np.broadcast_to(np.asarray(t_max, dtype=np.float64), (n,)).copy()
        if len(self.end) != n:
            raise ValueError(f"Segments: start has {n} rows but end has {len(self.end)}.")

    def __len__(self) -> int:
        return len(self.start)

    @staticmethod
    def empty() -> Segments:
        return Segments(np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros((0, 2)))

    @staticmethod
    def concat(parts: list[Segments]) -> Segments:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Segments.empty()
        return Segments(
            np.concatenate([p.start for p in parts]),
            np.concatenate([p.end for p in parts]),
            np.concatenate([p.half_width for p in parts]),
            np.concatenate([p.s0 for p in parts]),
            np.concatenate([p.lines for p in parts]),
            np.concatenate([p.t_max for p in parts]),
        )


def polyline_segments(
    points: np.ndarray,
    half_width: float,
    lines: tuple[int, int] = (LINE_NONE, LINE_NONE),
    tolerance: float = 0.1,
    s_start: float = 0.0,
) -> Segments:
    """Simplify a densely sampled centreline into straight segments.

    Consecutive points are merged greedily while every skipped point stays within ``tolerance`` metres
    of the chord, so straight stretches become one segment and curves a few chords.

    Args:
        points: ``[P, 2]`` centreline samples in order (P >= 2).
        half_width: half lane width [m].
        lines: boundary line types at lateral ``-w/2`` and ``+w/2``.
        tolerance: largest distance [m] between the polyline and a chord.
        s_start: longitudinal coordinate of ``points[0]`` along the lane.

    Example::

        >>> pts = np.stack([np.linspace(0, 50, 51), np.zeros(51)], axis=1)
        >>> len(polyline_segments(pts, 2.0))  # a straight line is one segment
        1
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2:
        raise ValueError(f"polyline_segments: points must have shape [P>=2, 2], got {points.shape}.")
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))]) + s_start
    keep = [0]
    i = 0
    while i < len(points) - 1:
        j = i + 1
        while j + 1 < len(points):
            a, b = points[i], points[j + 1]
            ab = b - a
            length = np.linalg.norm(ab)
            mid = points[i + 1 : j + 1]
            if length < 1e-9:
                dist = np.linalg.norm(mid - a, axis=1)
            else:
                dist = np.abs((mid[:, 0] - a[0]) * ab[1] - (mid[:, 1] - a[1]) * ab[0]) / length
            if dist.max(initial=0.0) > tolerance:
                break
            j += 1
        keep.append(j)
        i = j
    idx = np.asarray(keep)
    return Segments(points[idx[:-1]], points[idx[1:]], half_width, arc[idx[:-1]], np.asarray(lines))


@dataclass
class StaticRaster:
    """The static layers (drivable, solid lines, broken lines, route) pre-drawn on a world-aligned grid.

    Drawing lanes is the costly part of a BEV; the map does not move, so the simulator adapter draws
    it once per episode (:meth:`BEVRasterizer.prepare`) and each frame only *samples* this grid at the
    rotated pixel centres (nearest cell). With cells of half a BEV pixel the sampled masks differ
    from exact drawing only at boundary pixels.

    Attributes:
        origin: world ``(x, y)`` of the grid's corner.
        cell: cell size [m].
        layers: ``bool [4, nx, ny]``.

    Example::

        >>> r = BEVRasterizer(size=16, resolution=1.0, history=1)
        >>> road = polyline_segments(np.array([[-50.0, 0.0], [50.0, 0.0]]), half_width=2.0)
        >>> static = r.prepare(road, None, bounds=(-60, -20, 60, 20))
        >>> static.layers.shape, static.cell
        ((4, 240, 80), 0.5)
        >>> ego = np.array([0.0, 0.0, 0.0, 5.0, 2.0])
        >>> bool((r.render(ego, static=static)[0] == r.render(ego, road=road)[0]).all())
        True
    """

    origin: np.ndarray
    cell: float
    layers: np.ndarray


class BEVRasterizer:
    """Draws the binary BEV stack in the ego frame (see the module docstring for the conventions).

    Channels, in order: ``drivable`` (lane surfaces), ``lane_solid`` and ``lane_broken`` (lane
    boundary lines), ``route`` (the route's lanes up to its end), ``ego`` (ego footprint),
    ``obstacles`` (static objects), then ``vehicles_t-k`` for ``k = 0, stride, 2 stride, ...``
    (``history`` frames of the other vehicles' footprints, all drawn in the *current* ego frame, as in
    Think2Drive and Roach).

    Args:
        size: image height and width in pixels.
        resolution: metres per pixel.
        history: number of vehicle frames (>= 1).
        history_stride: frames between two drawn history frames (>= 1).
        ego_row: row of the ego centre, in pixels from the top (default ``size / 2``: the centre of the
            image); the BEV sees ``ego_row * resolution`` metres ahead and ``(size - ego_row) * resolution``
            behind.
        line_width: drawn width of lane lines [m] (at least one pixel is always hit).
        min_extent: smallest drawn length and width of a box [m] (default: one pixel, ``resolution`` long
            and ``min(resolution, lateral_resolution)`` wide).
        lateral_resolution: metres per pixel across (image columns; default ``resolution``, square
            pixels). A finer lateral than longitudinal resolution sees far ahead at highway speed and
            still resolves the ego's offset in its lane (a 4 m lane is 1.3 pixels wide at 3 m/pixel).
            Lane lines are drawn at least one column wide.

    Example::

        >>> r = BEVRasterizer(size=16, resolution=1.0, history=2)
        >>> road = polyline_segments(np.array([[-50.0, 0.0], [50.0, 0.0]]), half_width=2.0, lines=(2, 2))
        >>> bev = r.render(ego=np.array([0.0, 0.0, 0.0, 5.0, 2.0]), road=road,
        ...                vehicles=[np.array([[6.0, 0.0, 0.0, 4.0, 2.0]])])
        >>> bev.shape, bev.dtype, r.channels[:4]
        ((8, 16, 16), dtype('uint8'), ('drivable', 'lane_solid', 'lane_broken', 'route'))
        >>> # 5 m x 2 m car: pixel centres at +-0.5, +-1.5, +-2.5 m ahead lie in the closed box
        >>> int(bev[r.channels.index("ego")].sum())
        12
    """

    STATIC_CHANNELS = ("drivable", "lane_solid", "lane_broken", "route", "ego", "obstacles")

    def __init__(
        self,
        size: int = 64,
        resolution: float = 1.0,
        history: int = 4,
        history_stride: int = 1,
        ego_row: float | None = None,
        line_width: float = 0.3,
        min_extent: float | None = None,
        lateral_resolution: float | None = None,
    ) -> None:
        for name, value, low in (("size", size, 4), ("history", history, 1), ("history_stride", history_stride, 1)):
            check_int(value, name, minimum=low, owner="BEVRasterizer")
        if not (isinstance(resolution, (int, float)) and resolution > 0):
            raise ValueError(f"BEVRasterizer: resolution must be a positive number (m/pixel), got {resolution!r}.")
        ego_row = size / 2 if ego_row is None else float(ego_row)
        if not 0 <= ego_row <= size:
            raise ValueError(f"BEVRasterizer: ego_row must be in [0, size={size}], got {ego_row!r}.")
        if lateral_resolution is not None and not (
            isinstance(lateral_resolution, (int, float)) and lateral_resolution > 0
        ):
            raise ValueError(
                f"BEVRasterizer: lateral_resolution must be None or a positive number (m/pixel), got {lateral_resolution!r}."
            )
        self.size, self.resolution = size, float(resolution)
        self.lateral_resolution = self.resolution if lateral_resolution is None else float(lateral_resolution)
        self.history, self.history_stride = history, history_stride
        self.ego_row, self.line_width = ego_row, float(line_width)
        self.min_extent = self.resolution if min_extent is None else float(min_extent)
        # boxes are at least one pixel long (along the ego's axis) and one column wide
        self.min_width = min(self.min_extent, self.lateral_resolution) if min_extent is None else self.min_extent
        if not self.min_extent >= 0:
            raise ValueError(f"BEVRasterizer: min_extent must be >= 0 metres, got {min_extent!r}.")
        self.channels: tuple[str, ...] = self.STATIC_CHANNELS + tuple(
            f"vehicles_t-{k * history_stride}" for k in range(history)
        )
        # Pixel centres in the ego frame: forward (up the image) and right (along the columns).
        rows = np.arange(size, dtype=np.float64)
        cols = np.arange(size, dtype=np.float64)
        fwd = (ego_row - (rows + 0.5)) * self.resolution
        rgt = (cols + 0.5 - size / 2) * self.lateral_resolution
        self._fwd = np.repeat(fwd, size)  # [N]
        self._rgt = np.tile(rgt, size)  # [N]
        corners = np.array([[fwd.max(), rgt.max()], [fwd.min(), rgt.min()]])
        self.view_radius = float(np.abs(corners).max() * np.sqrt(2.0)) + max(self.resolution, self.lateral_resolution)

    @property
    def frames_needed(self) -> int:
        """How many past vehicle frames (including the current one) :meth:`render` reads."""
        return (self.history - 1) * self.history_stride + 1

    # -- geometry -------------------------------------------------------------------------------------
    @staticmethod
    def _to_ego(points: np.ndarray, ego: np.ndarray) -> np.ndarray:
        """World points ``[..., 2]`` -> ego-frame ``(forward, right)`` coordinates."""
        c, s = np.cos(ego[2]), np.sin(ego[2])
        d = points - ego[:2]
        return np.stack([d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c], axis=-1)

    def _boxes(self, boxes: np.ndarray | None, ego: np.ndarray) -> np.ndarray:
        out = np.zeros(self.size * self.size, dtype=bool)
        if boxes is None or len(boxes) == 0:
            return out
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        centres = self._to_ego(boxes[:, :2], ego)
        reach = np.linalg.norm(centres, axis=1) - 0.5 * np.hypot(boxes[:, 3], boxes[:, 4])
        keep = reach <= self.view_radius
        if not keep.any():
            return out
        boxes, centres = boxes[keep], centres[keep]
        theta = boxes[:, 2] - ego[2]
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        df = self._fwd[None] - centres[:, :1]
        dr = self._rgt[None] - centres[:, 1:]
        along = df * c + dr * s
        across = -df * s + dr * c
        half_len = np.maximum(boxes[:, 3:4], self.min_extent) / 2
        half_wid = np.maximum(boxes[:, 4:5], self.min_width) / 2
        inside = (np.abs(along) <= half_len) & (np.abs(across) <= half_wid)
        return inside.any(axis=0)

    def _segments(self, seg: Segments | None, ego: np.ndarray, lines: bool) -> tuple[np.ndarray, ...]:
        n = self.size * self.size
        empty = np.zeros(n, dtype=bool)
        if seg is None or len(seg) == 0:
            return (empty, empty, empty) if lines else (empty,)
        a = self._to_ego(seg.start, ego)
        b = self._to_ego(seg.end, ego)
        ab = b - a
        length = np.maximum(np.linalg.norm(ab, axis=1), 1e-9)
        u = ab / length[:, None]
        # Distance from the ego (origin of the ego frame) to each segment, for culling.
        t0 = np.clip(-(a * u).sum(1), 0.0, length)
        closest = a + u * t0[:, None]
        keep = np.linalg.norm(closest, axis=1) <= self.view_radius + seg.half_width + 1.0
        if not keep.any():
            return (empty, empty, empty) if lines else (empty,)
        a, u, length = a[keep], u[keep], length[keep]
        hw, s0, t_max = seg.half_width[keep], seg.s0[keep], seg.t_max[keep]
        df = self._fwd[None] - a[:, :1]
        dr = self._rgt[None] - a[:, 1:]
        along = df * u[:, :1] + dr * u[:, 1:]  # metres along the segment
        lat = -df * u[:, 1:] + dr * u[:, :1]  # lateral: the segment direction turned by +90 degrees
        # Overlap consecutive chords by half a metre so that curves have no gaps at their outer edge.
        eps = 0.5
        in_span = (along >= -eps) & (along <= (length * t_max)[:, None] + eps)
        surface = (in_span & (np.abs(lat) <= hw[:, None])).any(axis=0)
        if not lines:
            return (surface,)
        line_hw = max(self.line_width, self.lateral_resolution) / 2
        solid = np.zeros(n, dtype=bool)
        broken = np.zeros(n, dtype=bool)
        lines_keep = seg.lines[keep]
        s = s0[:, None] + along
        dash = np.mod(s, STRIPE_PERIOD) < STRIPE_LENGTH
        for side, offset in ((0, -1.0), (1, 1.0)):
            on_line = in_span & (np.abs(lat - offset * hw[:, None]) <= line_hw)
            kind = lines_keep[:, side][:, None]
            solid |= (on_line & (kind >= LINE_SOLID)).any(axis=0)
            broken |= (on_line & (kind == LINE_STRIPED) & dash).any(axis=0)
        return surface, solid, broken

    # -- static layers on a world grid -----------------------------------------------------------------
    def prepare(
        self,
        road: Segments | None,
        route: Segments | None,
        bounds: tuple[float, float, float, float],
        cell: float | None = None,
    ) -> StaticRaster:
        """Pre-draw the static layers inside ``bounds = (x_min, y_min, x_max, y_max)`` (see :class:`StaticRaster`).

        ``bounds`` should cover every point the BEV can see during the episode (the route's extent
        plus :attr:`view_radius`); outside it the static layers read as empty.
        """
        cell = min(self.resolution, self.lateral_resolution) / 2 if cell is None else float(cell)
        x0, y0, x1, y1 = (float(b) for b in bounds)
        nx = max(int(np.ceil((x1 - x0) / cell)), 1)
        ny = max(int(np.ceil((y1 - y0) / cell)), 1)
        layers = np.zeros((4, nx, ny), dtype=bool)
        line_hw = max(self.line_width, self.lateral_resolution) / 2
        eps = 0.5
        for seg, is_route in ((road, False), (route, True)):
            if seg is None:
                continue
            for k in range(len(seg)):
                a, b, hw = seg.start[k], seg.end[k], seg.half_width[k]
                ab = b - a
                length = max(float(np.linalg.norm(ab)), 1e-9)
                u = ab / length
                reach = hw + line_hw + eps
                lo = np.minimum(a, b) - reach
                hi = np.maximum(a, b) + reach
                i0, i1 = max(int((lo[0] - x0) / cell), 0), min(int(np.ceil((hi[0] - x0) / cell)), nx)
                j0, j1 = max(int((lo[1] - y0) / cell), 0), min(int(np.ceil((hi[1] - y0) / cell)), ny)
                if i0 >= i1 or j0 >= j1:
                    continue
                xs = x0 + (np.arange(i0, i1) + 0.5) * cell - a[0]
                ys = y0 + (np.arange(j0, j1) + 0.5) * cell - a[1]
                dx, dy = xs[:, None], ys[None, :]
                along = dx * u[0] + dy * u[1]
                lat = -dx * u[1] + dy * u[0]
                in_span = (along >= -eps) & (along <= length * seg.t_max[k] + eps)
                if is_route:
                    layers[3, i0:i1, j0:j1] |= in_span & (np.abs(lat) <= hw)
                    continue
                layers[0, i0:i1, j0:j1] |= in_span & (np.abs(lat) <= hw)
                dash = np.mod(seg.s0[k] + along, STRIPE_PERIOD) < STRIPE_LENGTH
                for side, offset in ((0, -1.0), (1, 1.0)):
                    kind = seg.lines[k, side]
                    if kind == LINE_NONE:
                        continue
                    on_line = in_span & (np.abs(lat - offset * hw) <= line_hw)
                    if kind >= LINE_SOLID:
                        layers[1, i0:i1, j0:j1] |= on_line
                    else:
                        layers[2, i0:i1, j0:j1] |= on_line & dash
        return StaticRaster(np.array([x0, y0]), cell, layers)

    def _sample(self, static: StaticRaster, ego: np.ndarray) -> np.ndarray:
        c, s = np.cos(ego[2]), np.sin(ego[2])
        x = ego[0] + self._fwd * c - self._rgt * s
        y = ego[1] + self._fwd * s + self._rgt * c
        i = np.floor((x - static.origin[0]) / static.cell).astype(np.int64)
        j = np.floor((y - static.origin[1]) / static.cell).astype(np.int64)
        nx, ny = static.layers.shape[1:]
        valid = (i >= 0) & (i < nx) & (j >= 0) & (j < ny)
        out = np.zeros((4, len(x)), dtype=bool)
        out[:, valid] = static.layers[:, i[valid], j[valid]]
        return out

    # -- drawing --------------------------------------------------------------------------------------
    def render(
        self,
        ego: np.ndarray,
        road: Segments | None = None,
        route: Segments | None = None,
        vehicles: list[np.ndarray] | None = None,
        obstacles: np.ndarray | None = None,
        static: StaticRaster | None = None,
    ) -> np.ndarray:
        """Rasterise one BEV stack.

        Args:
            ego: ``(x, y, heading, length, width)`` of the ego vehicle.
            road: the map's lane segments (drivable area and lines).
            route: the route's lane segments.
            vehicles: past frames of other vehicles, newest first: ``vehicles[k]`` is a ``[N_k, 5]`` box
                array ``k`` frames ago. Missing old frames (start of an episode) repeat the oldest one.
            obstacles: ``[M, 5]`` boxes of static objects.
            static: pre-drawn static layers (:meth:`prepare`); when given, ``road`` and ``route`` are
                not read.

        Returns:
            ``uint8`` array ``[len(channels), size, size]`` with values in ``{0, 1}``.
        """
        ego = np.asarray(ego, dtype=np.float64).reshape(-1)
        if ego.shape != (5,):
            raise ValueError(f"BEVRasterizer.render: ego must be (x, y, heading, length, width), got {ego.shape}.")
        n = self.size * self.size
        out = np.zeros((len(self.channels), n), dtype=bool)
        if static is not None:
            out[:4] = self._sample(static, ego)
        else:
            surface, solid, broken = self._segments(road, ego, lines=True)
            out[0], out[1], out[2] = surface, solid, broken
            out[3] = self._segments(route, ego, lines=False)[0]
        out[4] = self._boxes(ego[None], ego)
        out[5] = self._boxes(obstacles, ego)
        frames = list(vehicles) if vehicles else [None]
        for k in range(self.history):
            idx = min(k * self.history_stride, len(frames) - 1)
            out[6 + k] = self._boxes(frames[idx], ego)
        return out.reshape(len(self.channels), self.size, self.size).astype(np.uint8)


def colorize(bev: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
    """An RGB picture (``uint8 [H, W, 3]``) of a BEV stack, for rollout strips.

    Example::

        >>> r = BEVRasterizer(size=8, history=1)
        >>> colorize(np.zeros((len(r.channels), 8, 8), np.uint8), r.channels).shape
        (8, 8, 3)
    """
    palette = {
        "drivable": (70, 70, 70),
        "route": (40, 90, 160),
        "lane_broken": (200, 200, 200),
        "lane_solid": (255, 255, 255),
        "obstacles": (160, 100, 40),
        "ego": (230, 60, 60),
    }
    bev = np.asarray(bev)
    img = np.zeros((*bev.shape[1:], 3), dtype=np.float64)
    order = ["drivable", "route", "lane_broken", "lane_solid", "obstacles"]
    vehicle_channels = [c for c in channels if c.startswith("vehicles_t-")]
    for name in order:
        if name in channels:
            img[bev[channels.index(name)] > 0] = palette[name]
    for rank, name in reversed(list(enumerate(vehicle_channels))):
        fade = 1.0 - 0.6 * rank / max(len(vehicle_channels), 1)
        img[bev[channels.index(name)] > 0] = (60 * fade, 200 * fade, 90 * fade)
    if "ego" in channels:
        img[bev[channels.index("ego")] > 0] = palette["ego"]
    return img.astype(np.uint8)

"""The three mediapipe models its wheel ships (no download): face detection, the 478-point face mesh
with iris, and selfie segmentation. Imported lazily: mediapipe takes a second to load."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ logging: errors only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _solutions():
    import mediapipe as mp

    return mp.solutions


@dataclasses.dataclass
class FaceBox:
    """A detection in pixel coordinates."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    # BlazeFace's 6 keypoints (x, y): right eye, left eye, nose tip, mouth centre, right ear, left ear
    keypoints: np.ndarray | None = None

    @property
    def size(self) -> float:
        return max(self.x1 - self.x0, self.y1 - self.y0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    @property
    def roll(self) -> float | None:
        """Clockwise degrees the face is turned in the picture (0 upright, 90 lying with the top of the head
        to the right, 180 upside down), from the eyes-to-mouth direction; None without keypoints."""
        if self.keypoints is None or len(self.keypoints) < 4:
            return None
        down = self.keypoints[3] - (self.keypoints[0] + self.keypoints[1]) / 2
        return float(np.degrees(np.arctan2(-down[0], down[1]))) % 360

    def as_list(self) -> list[float]:
        return [round(self.x0, 2), round(self.y0, 2), round(self.x1, 2), round(self.y1, 2)]


class _MediapipeModel:
    """Owns one mediapipe graph; use as a context manager so its threads are released."""

    _model = None

    def close(self):
        self._model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FaceDetector(_MediapipeModel):
    """BlazeFace: the short-range model (fast, best on the large faces of portrait video) with the
    full-range one as a second opinion on frames where it finds nothing (small faces in wide shots)."""

    def __init__(self, min_confidence: float = 0.5):
        fd = _solutions().face_detection
        self._model = fd.FaceDetection(model_selection=0, min_detection_confidence=min_confidence)
        self._full = fd.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        rgb = np.ascontiguousarray(rgb)
        boxes = self._boxes(self._model, rgb) or self._boxes(self._full, rgb)
        return sorted(boxes, key=lambda b: -b.size)

    @staticmethod
    def _boxes(model, rgb: np.ndarray) -> list[FaceBox]:
        h, w = rgb.shape[:2]
        boxes = []
        for det in model.process(rgb).detections or []:
            b = det.location_data.relative_bounding_box
            keypoints = np.array([(k.x * w, k.y * h) for k in det.location_data.relative_keypoints], np.float32)
            boxes.append(
                FaceBox(
                    b.xmin * w,
                    b.ymin * h,
                    (b.xmin + b.width) * w,
                    (b.ymin + b.height) * h,
                    float(det.score[0]),
                    keypoints,
                )
            )
        return boxes

    def close(self):
        super().close()
        self._full.close()


class FaceMeshTracker(_MediapipeModel):
    """478 landmarks (pixels x, y; z relative depth in pixel units) of up to `max_faces` faces.

    In video mode mediapipe tracks between frames, which is both faster and steadier."""

    def __init__(self, min_confidence: float = 0.5, max_faces: int = 3, video: bool = True):
        self._model = _solutions().face_mesh.FaceMesh(
            static_image_mode=not video,
            max_num_faces=max_faces,
            refine_landmarks=True,
            min_detection_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
        )

    def detect(self, rgb: np.ndarray) -> list[np.ndarray]:
        h, w = rgb.shape[:2]
        result = self._model.process(np.ascontiguousarray(rgb))
        faces = []
        for face in result.multi_face_landmarks or []:
            pts = np.array([(p.x, p.y, p.z) for p in face.landmark], dtype=np.float32)
            pts *= np.array([w, h, w], dtype=np.float32)  # mediapipe's z shares x's scale
            faces.append(pts)
        return faces


class SelfieSegmenter(_MediapipeModel):
    """Soft person matte in [0, 1]."""

    def __init__(self, landscape: bool = False):
        self._model = _solutions().selfie_segmentation.SelfieSegmentation(model_selection=1 if landscape else 0)

    def matte(self, rgb: np.ndarray) -> np.ndarray:
        return np.clip(self._model.process(np.ascontiguousarray(rgb)).segmentation_mask, 0.0, 1.0)
